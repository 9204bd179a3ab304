"""JumpReLU SAE (Rajamanoharan et al. 2024): a learned per-latent threshold, trained through
straight-through estimators with a rectangular kernel of width `bandwidth`.

The estimators depend on the pre-activation h only through h - theta, so the input's
pseudo-derivative is the negated threshold's. Rajamanoharan et al. give it to the threshold
only; with `ste_to_input` it also reaches h (and so the encoder), as in Anthropic's January
2025 update. Then the sparsity penalty moves the encoder too, and L0 can fall as fast as a
standard SAE's instead of at the pace of thresholds that Adam moves by about lr per step.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from saekit.kernels.jumprelu import JumpReLUFunction, JumpReLUWithL0, StepFunction, TanhPenalty
from saekit.saes.base import SAE, DeadLatentRemedy, LossSettings
from saekit.saes.registry import register_architecture


@register_architecture("jumprelu")
class JumpReLUSAE(SAE):
    penalty_counts_latents = True
    loss_coefficients: ClassVar[dict[str, str | None]] = {
        "l0": "sparsity_coefficient", "pre_act": "threshold_pre_act_coefficient",
    }
    dead_latent_remedy: ClassVar[DeadLatentRemedy] = DeadLatentRemedy(
        losses=("pre_act",), lift_quiet=True, resample=True
    )
    #: Starting threshold for every latent (the value sae-lens also uses).
    initial_threshold = 0.001
    #: (latents, L0, pre-activation loss) of the last training pass, until
    #: `sparsity_losses` takes them.
    _pending_l0: ClassVar[tuple[Tensor, Tensor, Tensor] | None] = None

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        return {**super().parameter_shapes(), "threshold": (self.cfg.d_sae,)}

    @torch.no_grad()
    def initialize_weights(self) -> None:
        super().initialize_weights()
        self.threshold.fill_(self.initial_threshold)

    def activation(self, hidden_pre: Tensor) -> Tensor:
        return torch.relu(hidden_pre) * (hidden_pre > self.threshold)

    def training_latents(self, hidden_pre: Tensor, settings: LossSettings) -> Tensor:
        bandwidth = settings.threshold_bandwidth
        return JumpReLUFunction.apply(
            torch.relu(hidden_pre), self.threshold, bandwidth, settings.ste_to_input
        )

    def training_pass(
        self, x: Tensor, centred: Tensor, settings: LossSettings, last_l0: float | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The latents come with their L0 from one fused function (`JumpReLUWithL0`), which
        writes them over the pre-activations; so both of the first two slots hold the latents,
        and `sparsity_losses` takes the L0 computed here."""
        hidden_pre = self.pre_activations(*self.encoder_input(x, centred))
        if hidden_pre._is_view():  # autograd cannot rebase a view that is written over
            hidden_pre = hidden_pre.clone()
        step = settings.threshold_penalty == "step"
        latents, l0, pre_act = JumpReLUWithL0.apply(
            hidden_pre, self.threshold, settings.threshold_bandwidth, step,
            settings.ste_to_input, self._pre_act_weights(settings),
        )
        self._pending_l0 = (latents, l0, pre_act)
        return latents, latents, self.reconstruct(x, latents)

    def sparsity_losses(
        self, x: Tensor, hidden_pre: Tensor, latents: Tensor, settings: LossSettings
    ) -> dict[str, Tensor]:
        pending, self._pending_l0 = self._pending_l0, None
        from_pass = pending is not None and pending[0] is latents  # from training_pass
        if settings.threshold_penalty == "tanh":
            flat = latents.reshape(-1, latents.shape[-1])
            penalty = TanhPenalty.apply(flat, self.decoder_norms(), settings.tanh_scale)
        elif from_pass:
            penalty = pending[1]
        else:
            fired = StepFunction.apply(
                hidden_pre, self.threshold, settings.threshold_bandwidth,
                settings.ste_to_input,
            )
            penalty = fired.sum(dim=-1).mean()
        losses = {"l0": settings.sparsity_coefficient * penalty}
        if settings.threshold_pre_act_coefficient:
            if from_pass:
                losses["pre_act"] = pending[2]
            else:
                below = torch.relu(self.threshold.clamp_min(0) - hidden_pre)
                losses["pre_act"] = (below * self._pre_act_weights(settings)).sum(-1).mean()
        return losses

    def _pre_act_weights(self, settings: LossSettings) -> Tensor | None:
        """c * ||W_dec[i]|| per latent for the pre-activation loss (the norms as constants),
        or None when it is off."""
        coefficient = settings.threshold_pre_act_coefficient
        return coefficient * self.decoder_norms().detach() if coefficient else None

    def per_latent_encoder_scales(self) -> tuple[str, ...]:
        return ("b_enc", "threshold")

    @torch.no_grad()
    def set_firing_point(self, latents: Tensor, points: Tensor) -> None:
        # Fires where h = x~ . w + b_enc exceeds theta, i.e. x~ . w > theta - b_enc; theta
        # may not be negative, so a negative point moves into the bias.
        threshold = points.clamp_min(0).to(self.dtype)
        self.threshold[latents] = threshold
        self.b_enc[latents] = threshold - points.to(self.dtype)

    def firing_point(self, latents: Tensor) -> Tensor:
        return self.threshold[latents] - self.b_enc[latents]

    @torch.no_grad()
    def post_optimizer_step(self) -> None:
        self.threshold.clamp_(min=0.0)
