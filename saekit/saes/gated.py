"""Gated SAE (Rajamanoharan et al. 2024): a gate decides which latents fire, a magnitude
path (sharing W_enc up to a per-latent scale exp(r_mag)) decides how strongly."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from saekit.kernels.gated import GatedEncoder
from saekit.saes.base import (
    SAE,
    DeadLatentRemedy,
    LossSettings,
    auxiliary_reconstruction,
    squared_error,
    weighted_sum_mean,
)
from saekit.saes.registry import register_architecture
from saekit.saes.standard import silent_latent_term


@register_architecture("gated")
class GatedSAE(SAE):
    #: Its auxiliary loss decodes through a frozen decoder, which would let free decoder
    #: norms grow without bound: the rows are kept at unit norm.
    unit_norm_decoder: ClassVar[bool] = True
    loss_coefficients: ClassVar[dict[str, str | None]] = {
        "l1": "sparsity_coefficient", "aux_reconstruction": None,
        "dead_pre_act": "dead_pre_act_coefficient", "aux_k": "aux_k_coefficient",
    }
    dead_latent_remedy: ClassVar[DeadLatentRemedy] = DeadLatentRemedy(
        losses=("dead_pre_act", "aux_k"), loss_on_quiet=True, lift_quiet=True
    )
    #: The gate activations of the last training pass, until `sparsity_losses` uses them.
    _pending_gate_acts: ClassVar[Tensor | None] = None

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = super().parameter_shapes()
        del shapes["b_enc"]
        d_sae = (self.cfg.d_sae,)
        return {**shapes, "b_gate": d_sae, "b_mag": d_sae, "r_mag": d_sae}

    def encode_parts(
        self, x: Tensor, settings: LossSettings | None = None, centre: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(pi_gate, latents): the gate's pre-activation and gate * magnitude."""
        if centre is not None:
            x = x - centre
        shared = x @ self.W_enc  # [batch, d_sae]; x (W_enc * exp(r_mag)) = shared * exp(r_mag)
        pi_gate = shared + self.b_gate
        magnitude = torch.relu(torch.addcmul(self.b_mag, shared, torch.exp(self.r_mag)))
        return pi_gate, (pi_gate > 0).to(x.dtype) * magnitude

    def training_pass(
        self, x: Tensor, centred: Tensor, settings: LossSettings, last_l0: float | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Hands on ReLU(pi_gate), which is all the losses need of the gate, in the first slot."""
        encoder_input, centre = self.encoder_input(x, centred)
        gate_acts, latents = GatedEncoder.apply(
            encoder_input, centre, self.W_enc, self.b_gate, self.b_mag, self.r_mag
        )
        self._pending_gate_acts = gate_acts
        return gate_acts, latents, self.reconstruct(x, latents)

    def sparsity_losses(
        self, x: Tensor, hidden_pre: Tensor, latents: Tensor, settings: LossSettings
    ) -> dict[str, Tensor]:
        pending, self._pending_gate_acts = self._pending_gate_acts, None
        # hidden_pre is pi_gate, or ReLU(pi_gate) already when it comes from training_pass
        gate_acts = hidden_pre if hidden_pre is pending else torch.relu(hidden_pre)
        l1 = weighted_sum_mean(gate_acts, self.decoder_norms())
        # The gate path alone, through a frozen decoder, must reconstruct the input; this is
        # what trains W_enc and b_gate, since the Heaviside gate passes no gradient.
        aux_recon = gate_acts @ self.W_dec.detach() + self.b_dec.detach()
        return {
            "l1": settings.sparsity_coefficient * l1,
            "aux_reconstruction": squared_error(aux_recon, x),
        }

    def dead_latent_losses(
        self,
        centred: Tensor,
        hidden_pre: Tensor,
        residual: Tensor,
        dead_mask: Tensor,
        settings: LossSettings,
    ) -> dict[str, Tensor]:
        # As for standard SAEs, on the gate: a closed gate passes no gradient at all. Only the
        # silent latents' gate pre-activations are formed.
        def gate_pre_activations(latents: Tensor) -> Tensor:
            with torch.no_grad():
                return centred @ self.W_enc.index_select(1, latents) + self.b_gate[latents]

        losses = silent_latent_term(
            self, centred, dead_mask, settings, self.b_gate, gate_pre_activations
        )
        if settings.aux_k_coefficient:
            # The term above only opens a silent gate; AuxK also points the latent somewhere
            # useful: its direction (the encoder product without the bias, which the lift
            # sets) and its decoder row learn to explain what the live latents missed.
            silent = dead_mask.nonzero().squeeze(1)
            products = centred.detach() @ self.W_enc.index_select(1, silent)
            k_aux = settings.k_aux or self.cfg.d_in // 2
            aux = auxiliary_reconstruction(
                torch.relu(products), silent, self.W_dec, residual.detach(), k_aux,
                settings.replica_mean,
            )
            losses["aux_k"] = settings.aux_k_coefficient * aux
        return losses

    def per_latent_encoder_scales(self) -> tuple[str, ...]:
        return ("b_gate", "b_mag")

    def latent_axes(self) -> dict[str, int]:
        return {**super().latent_axes(), "r_mag": 0}

    @torch.no_grad()
    def set_firing_point(self, latents: Tensor, points: Tensor) -> None:
        # The gate opens where x~ . W_enc > point; the magnitude exp(r_mag) (x~ . W_enc -
        # point) is then positive wherever the gate is open.
        points = points.to(self.dtype)
        self.b_gate[latents] = -points
        self.b_mag[latents] = -torch.exp(self.r_mag[latents]) * points

    def firing_point(self, latents: Tensor) -> Tensor:
        return -self.b_gate[latents]

    @torch.no_grad()
    def resample_latents(
        self, latents: Tensor, centred: Tensor, residual: Tensor, rows: Tensor,
        firing_rate: float,
    ) -> None:
        self.r_mag[latents] = 0.0  # the magnitude path starts at the gate's scale
        super().resample_latents(latents, centred, residual, rows, firing_rate)
