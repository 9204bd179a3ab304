"""Gated SAE (Rajamanoharan et al. 2024): a gate decides which latents fire, a magnitude
path (sharing W_enc up to a per-latent scale exp(r_mag)) decides how strongly."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from saekit.saes.base import (
    SAE,
    LossSettings,
    column_sums,
    squared_error,
    weighted_sum_mean,
)
from saekit.saes.registry import register_architecture


class GatedEncoder(torch.autograd.Function):
    """(ReLU(pi_gate), latents) of a gated SAE for x [batch, d_in], in one function.

    pi_gate = x~ W_enc + b_gate and pi_mag = x~ (W_enc * exp(r_mag)) + b_mag
    = (x~ W_enc) * exp(r_mag) + b_mag share one matmul, with x~ = x - centre (or x when centre
    is None); latents = 1[pi_gate > 0] * ReLU(pi_mag).

    Each element-wise pass over a [batch, d_sae] tensor costs memory traffic and each new
    tensor of that size page faults, so the backward pass reuses the forward's buffers: the
    gate mask becomes the gradient of x~ W_enc, and x~ W_enc itself (needed for r_mag's
    gradient) then holds the gate path's gradient. The centre's gradient is a vector-matrix
    product, as in `CentredAffine`.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        centre: Tensor | None,
        W_enc: Tensor,
        b_gate: Tensor,
        b_mag: Tensor,
        r_mag: Tensor,
    ) -> tuple[Tensor, Tensor]:
        centred = x if centre is None else x - centre
        shared = centred @ W_enc  # [batch, d_sae]
        scale = torch.exp(r_mag)
        gate_acts = torch.add(shared, b_gate)  # pi_gate
        work = torch.gt(gate_acts, 0, out=torch.empty_like(shared))  # the gate, as 0/1
        gate_acts.relu_()
        latents = torch.addcmul(b_mag, shared, scale).relu_().mul_(work)
        ctx.save_for_backward(centred, W_enc, scale, gate_acts, latents)
        ctx.shared, ctx.work = shared, work
        return gate_acts, latents

    @staticmethod
    def backward(
        ctx: Any, grad_gate_acts: Tensor, grad_latents: Tensor
    ) -> tuple[Tensor | None, ...]:
        if ctx.work is None:
            raise RuntimeError(
                "GatedEncoder reuses its forward buffers for gradients, so it supports a single "
                "backward pass (no retain_graph)"
            )
        shared, work, ctx.shared, ctx.work = ctx.shared, ctx.work, None, None
        centred, W_enc, scale, gate_acts, latents = ctx.saved_tensors
        need_x, need_centre, need_w, need_b_gate, need_b_mag, need_r_mag = ctx.needs_input_grad

        # Magnitude path: latents > 0 exactly where the gate is open and pi_mag > 0.
        grad_mag = torch.gt(latents, 0, out=work).mul_(grad_latents)  # d/d pi_mag
        grad_b_mag = column_sums(grad_mag) if need_b_mag else None
        grad_r_mag = scale * column_sums(shared.mul_(grad_mag)) if need_r_mag else None
        # Gate path (gradients from the sparsity and auxiliary losses only).
        grad_gate = torch.gt(gate_acts, 0, out=shared).mul_(grad_gate_acts)  # d/d pi_gate
        grad_b_gate = column_sums(grad_gate) if need_b_gate else None
        grad_shared = grad_mag.mul_(scale).add_(grad_gate)  # d/d (x~ W_enc)

        grad_w = centred.T @ grad_shared if need_w else None
        grad_x = grad_shared @ W_enc.T if need_x else None
        grad_centre = -(column_sums(grad_shared) @ W_enc.T) if need_centre else None
        return grad_x, grad_centre, grad_w, grad_b_gate, grad_b_mag, grad_r_mag


@register_architecture("gated")
class GatedSAE(SAE):
    #: Its auxiliary loss decodes through a frozen decoder, which would let free decoder
    #: norms grow without bound: the rows are kept at unit norm.
    unit_norm_decoder: ClassVar[bool] = True
    loss_coefficients: ClassVar[dict[str, str | None]] = {
        "l1": "sparsity_coefficient", "aux_reconstruction": None,
    }
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
        self, x: Tensor, centred: Tensor, settings: LossSettings
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

    def per_latent_encoder_scales(self) -> tuple[str, ...]:
        return ("b_gate", "b_mag")
