"""The gated SAE's encoder as one autograd function: the gate and magnitude paths share the
centred input and W_enc, and their gradients are formed together (tests/test_sae_math.py
checks them against plain autograd)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from saekit.kernels.affine import column_sums


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
