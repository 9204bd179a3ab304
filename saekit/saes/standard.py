"""ReLU SAE with an L1 penalty weighted by decoder-row norms."""

from __future__ import annotations

import torch
from torch import Tensor

from saekit.saes.base import SAE, LossSettings
from saekit.saes.registry import register_architecture


@register_architecture("standard")
class StandardSAE(SAE):
    def activation(self, hidden_pre: Tensor) -> Tensor:
        return torch.relu(hidden_pre)

    def sparsity_losses(
        self, x: Tensor, hidden_pre: Tensor, latents: Tensor, settings: LossSettings
    ) -> dict[str, Tensor]:
        weighted = latents * self.decoder_norms()  # [batch, d_sae]
        return {"l1": settings.sparsity_coefficient * weighted.sum(dim=-1).mean()}
