"""The encoder's affine map of a centred input, with a centre gradient that costs a
vector-matrix product instead of a second batch-sized matmul; `torch.addmm` is its eager twin
(tests/test_sae_math.py checks the gradients against plain autograd)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def column_sums(t: Tensor) -> Tensor:
    """t [n, d] summed over its rows, as a vector-matrix product: one read of t, and on CPU
    several times faster than `t.sum(dim=0)`. Not for tensors that need a gradient through
    this sum (autograd would expand it into an [n, d] outer product)."""
    return t.new_ones(t.shape[0]) @ t


class CentredAffine(torch.autograd.Function):
    """(x - centre) @ weight + bias for x [batch, d_in], centre [d_in], weight [d_in, d_out].

    Autograd would first form the gradient of the centred input, g @ weight.T, a matmul as big
    as the forward one, only to sum it over the batch for the centre. Summing g first gives the
    centre's gradient as -(sum_b g_b) @ weight.T, a vector-matrix product; the gradient of x
    itself is computed only when x requires one.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, centre: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        centred = x - centre
        ctx.save_for_backward(centred, weight)
        return torch.addmm(bias, centred, weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        centred, weight = ctx.saved_tensors
        need_x, need_centre, need_weight, need_bias = ctx.needs_input_grad
        grad_x = grad @ weight.T if need_x else None
        grad_sum = column_sums(grad) if need_centre or need_bias else None
        grad_centre = -(grad_sum @ weight.T) if need_centre else None  # type: ignore[operator]
        grad_weight = centred.T @ grad if need_weight else None
        return grad_x, grad_centre, grad_weight, grad_sum if need_bias else None


def centred_affine(x: Tensor, centre: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """(x - centre) @ weight + bias for x [..., d_in], with the cheap centre gradient of
    `CentredAffine`."""
    if x.ndim == 2:
        return CentredAffine.apply(x, centre, weight, bias)
    out = CentredAffine.apply(x.reshape(-1, x.shape[-1]), centre, weight, bias)
    return out.reshape(*x.shape[:-1], weight.shape[-1])
