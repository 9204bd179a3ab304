"""ReLU SAE with an L1 penalty weighted by decoder-row norms."""

from __future__ import annotations

import torch
from torch import Tensor

from saekit.saes.base import SAE, LossSettings, weighted_sum_mean
from saekit.saes.registry import register_architecture


@register_architecture("standard")
class StandardSAE(SAE):
    def activation(self, hidden_pre: Tensor) -> Tensor:
        return torch.relu(hidden_pre)

    def sparsity_losses(
        self, x: Tensor, hidden_pre: Tensor, latents: Tensor, settings: LossSettings
    ) -> dict[str, Tensor]:
        l1 = weighted_sum_mean(latents, self.decoder_norms())
        return {"l1": settings.sparsity_coefficient * l1}


@register_architecture("tanh_relu")
class TanhReLUSAE(StandardSAE):
    """f = tanh(ReLU(h)): an activation older sae-lens releases use (activation_fn_str
    "tanh-relu"); trained with the standard decoder-norm-weighted L1."""

    def activation(self, hidden_pre: Tensor) -> Tensor:
        return torch.tanh(torch.relu(hidden_pre))

    def fold_W_dec_norm(self) -> None:
        raise ValueError(
            "tanh is not scale-equivariant, so decoder norms cannot be folded into a tanh_relu "
            "SAE's encoder without changing what it computes"
        )
