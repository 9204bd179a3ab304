"""Gated SAE (Rajamanoharan et al. 2024): a gate decides which latents fire, a magnitude
path (sharing W_enc up to a per-latent scale exp(r_mag)) decides how strongly."""

from __future__ import annotations

import torch
from torch import Tensor

from saekit.saes.base import SAE, LossSettings, squared_error
from saekit.saes.registry import register_architecture


@register_architecture("gated")
class GatedSAE(SAE):
    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = super().parameter_shapes()
        del shapes["b_enc"]
        d_sae = (self.cfg.d_sae,)
        return {**shapes, "b_gate": d_sae, "b_mag": d_sae, "r_mag": d_sae}

    def encode_parts(
        self, x: Tensor, settings: LossSettings | None = None
    ) -> tuple[Tensor, Tensor]:
        """(pi_gate, latents): the gate's pre-activation and gate * magnitude."""
        pi_gate = x @ self.W_enc + self.b_gate  # [batch, d_sae]
        magnitude = torch.relu(x @ (self.W_enc * torch.exp(self.r_mag)) + self.b_mag)
        return pi_gate, (pi_gate > 0).to(x.dtype) * magnitude

    def sparsity_losses(
        self, x: Tensor, hidden_pre: Tensor, latents: Tensor, settings: LossSettings
    ) -> dict[str, Tensor]:
        gate_acts = torch.relu(hidden_pre)  # [batch, d_sae]
        l1 = (gate_acts * self.decoder_norms()).sum(dim=-1).mean()
        # The gate path alone, through a frozen decoder, must reconstruct the input; this is
        # what trains W_enc and b_gate, since the Heaviside gate passes no gradient.
        aux_recon = gate_acts @ self.W_dec.detach() + self.b_dec.detach()
        return {
            "l1": settings.sparsity_coefficient * l1,
            "aux_reconstruction": squared_error(aux_recon, x),
        }

    def per_latent_encoder_scales(self) -> tuple[str, ...]:
        return ("b_gate", "b_mag")
