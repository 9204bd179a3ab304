"""ReLU SAE with an L1 penalty weighted by decoder-row norms."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor

from saekit.kernels.sparse_topk import SelectedLatents
from saekit.saes.base import SAE, DeadLatentRemedy, LossSettings, weighted_sum_mean
from saekit.saes.registry import register_architecture

#: The sparse training path is taken while at most this share of the latents fired in the
#: previous step. A step (d_in 256, 16x, batch 4096, 2 CPU cores) ran 0.83x the dense one at
#: 20% firing, 1.39x at 10%, 2.26x at 5% and 3.19x at 3% (the dense step: 650-800 ms).
SPARSE_DENSITY_LIMIT = 0.1


@register_architecture("standard")
class StandardSAE(SAE):
    loss_coefficients: ClassVar[dict[str, str | None]] = {
        "l1": "sparsity_coefficient", "dead_pre_act": "dead_pre_act_coefficient",
    }
    dead_latent_remedy: ClassVar[DeadLatentRemedy] = DeadLatentRemedy(
        losses=("dead_pre_act",), loss_on_quiet=True, lift_quiet=True
    )
    #: With 1e-3, 1,200 steps of a target-L0 run left standard SAEs far from converged
    #: (explained variance 0.74 against 0.96 at 3e-3; benchmarks/README.md).
    default_lr: ClassVar[float] = 3e-3
    #: Whether f = ReLU(h), so the training pass can keep only the positive pre-activations
    #: (the sparse top-k kernel's decode and backward, with every positive pair selected).
    relu_activation: ClassVar[bool] = True

    def activation(self, hidden_pre: Tensor) -> Tensor:
        return torch.relu(hidden_pre)

    def training_pass(
        self, x: Tensor, centred: Tensor, settings: LossSettings, last_l0: float | None = None
    ) -> tuple[Tensor, Tensor | SelectedLatents, Tensor]:
        # Once few latents fire (a trained standard SAE: a few percent), the decoder and
        # every product of the backward touch only the firing pairs, as for top-k SAEs.
        # The L0 of the trainer's last step decides (the first step is dense).
        sparse = (
            settings.use_sparse_kernel and self.relu_activation and not self.is_transcoder
            and last_l0 is not None and last_l0 <= SPARSE_DENSITY_LIMIT * self.cfg.d_sae
        )
        if not sparse:
            return super().training_pass(x, centred, settings, last_l0)
        # Every firing pair, row-major (in token order, as the kernel wants).
        return self.sparse_training_pass(centred, lambda h: (h > 0).nonzero().unbind(1))

    def sparsity_losses(
        self,
        x: Tensor,
        hidden_pre: Tensor,
        latents: Tensor | SelectedLatents,
        settings: LossSettings,
    ) -> dict[str, Tensor]:
        norms = self.decoder_norms()
        if isinstance(latents, SelectedLatents):
            l1 = (latents.values * norms.index_select(0, latents.latent)).sum() / latents.shape[0]
        else:
            l1 = weighted_sum_mean(latents, norms)
        return {"l1": settings.sparsity_coefficient * l1}

    def dead_latent_losses(
        self,
        centred: Tensor,
        hidden_pre: Tensor,
        residual: Tensor,
        dead_mask: Tensor,
        settings: LossSettings,
    ) -> dict[str, Tensor]:
        # A dead ReLU latent gets no gradient from the reconstruction or the penalty; this term
        # gives it one, towards the inputs it is least negative on.
        return silent_latent_term(
            self, centred, dead_mask, settings, self.b_enc,
            lambda dead: hidden_pre.detach().index_select(1, dead),
        )


def silent_latent_term(
    sae: SAE, centred: Tensor, silent: Tensor, settings: LossSettings, bias: Tensor,
    pre_activations_of: Callable[[Tensor], Tensor],
) -> dict[str, Tensor]:
    """{"dead_pre_act": the term below} for the latents marked in `silent` [d_sae], whose
    pre-activations are centred @ W_enc + bias (`pre_activations_of(latents)` gives them,
    [batch, n]); empty when the term's coefficient is 0."""
    if settings.dead_pre_act_coefficient == 0:
        return {}
    latents = silent.nonzero().squeeze(1)
    weights = sae.decoder_norms().detach().index_select(0, latents)
    pre = pre_activations_of(latents)
    loss = dead_pre_activation_loss(centred, sae.W_enc, bias, pre, latents, weights)
    return {"dead_pre_act": settings.dead_pre_act_coefficient * loss}


def dead_pre_activation_loss(
    centred: Tensor, W_enc: Tensor, b_enc: Tensor, dead_pre: Tensor, dead: Tensor,
    weights: Tensor,
) -> Tensor:
    """Mean over tokens of sum_i weights_i * ReLU(-h_i) over the latents `dead`, where
    h = centred @ W_enc + b_enc and `dead_pre` [batch, n_dead] holds its values for them.

    The term is linear in W_enc and b_enc once the tokens below zero are fixed, so it is built
    from their per-latent sums of inputs ([n_dead, d_in]) rather than from h's graph: the
    sparse training pass keeps none, and the matmul costs n_dead / d_sae of the encoder's.
    The centred input is held constant, so the term moves only the encoder.
    """
    below = (dead_pre < 0).to(centred.dtype)  # [batch, n_dead]
    input_sums = below.T @ centred.detach()  # [n_dead, d_in]
    h_sums = (input_sums * W_enc.index_select(1, dead).T).sum(1)
    h_sums = h_sums + below.sum(0) * b_enc.index_select(0, dead)  # sum of h_i where h_i < 0
    return -(weights * h_sums).sum() / centred.shape[0]


@register_architecture("tanh_relu")
class TanhReLUSAE(StandardSAE):
    """f = tanh(ReLU(h)): an activation older sae-lens releases use (activation_fn_str
    "tanh-relu"); trained with the standard decoder-norm-weighted L1."""

    relu_activation: ClassVar[bool] = False

    def activation(self, hidden_pre: Tensor) -> Tensor:
        return torch.tanh(torch.relu(hidden_pre))

    def fold_W_dec_norm(self) -> None:
        raise ValueError(
            "tanh is not scale-equivariant, so decoder norms cannot be folded into a tanh_relu "
            "SAE's encoder without changing what it computes"
        )
