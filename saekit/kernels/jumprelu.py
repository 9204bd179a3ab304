"""The autograd functions behind JumpReLU SAEs: the thresholded activation, its step and
tanh penalties and the fused L0 pass, each with straight-through gradients through a
rectangular kernel of width `bandwidth` (see saekit/saes/jumprelu.py for the model and
tests/test_sae_math.py for the checks against plain autograd of the same formulas)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from saekit.kernels.affine import column_sums


def _kernel(hidden_pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """rect((h - theta) / eps) / eps: the pseudo-derivative's window."""
    inside = ((hidden_pre - threshold) / bandwidth).abs() < 0.5
    return inside.to(hidden_pre.dtype) / bandwidth


def _sum_to_threshold(grad: Tensor) -> Tensor:
    return grad.reshape(-1, grad.shape[-1]).sum(dim=0)  # [d_sae]


class JumpReLUFunction(torch.autograd.Function):
    """f = h * 1[h > theta]; d f / d theta ~ -(theta / eps) rect((h - theta) / eps), and
    with ste_to_input d f / d h ~ 1[h > theta] + (theta / eps) rect((h - theta) / eps)."""

    @staticmethod
    def forward(
        ctx: Any, hidden_pre: Tensor, threshold: Tensor, bandwidth: float,
        ste_to_input: bool = False,
    ) -> Tensor:
        ctx.save_for_backward(hidden_pre, threshold)
        ctx.bandwidth, ctx.ste_to_input = bandwidth, ste_to_input
        return hidden_pre * (hidden_pre > threshold)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, Tensor, None, None]:
        hidden_pre, threshold = ctx.saved_tensors
        pseudo = grad_out * threshold * _kernel(hidden_pre, threshold, ctx.bandwidth)
        grad_h = grad_out * (hidden_pre > threshold)
        if ctx.ste_to_input:
            grad_h = grad_h + pseudo
        return grad_h, -_sum_to_threshold(pseudo), None, None


class StepFunction(torch.autograd.Function):
    """H(h - theta); d H / d theta ~ -(1 / eps) rect((h - theta) / eps), and d H / d h the
    negation of that with ste_to_input (no gradient to h without)."""

    @staticmethod
    def forward(
        ctx: Any, hidden_pre: Tensor, threshold: Tensor, bandwidth: float,
        ste_to_input: bool = False,
    ) -> Tensor:
        ctx.save_for_backward(hidden_pre, threshold)
        ctx.bandwidth, ctx.ste_to_input = bandwidth, ste_to_input
        return (hidden_pre > threshold).to(hidden_pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor, None, None]:
        hidden_pre, threshold = ctx.saved_tensors
        pseudo = grad_out * _kernel(hidden_pre, threshold, ctx.bandwidth)
        return (pseudo if ctx.ste_to_input else None), -_sum_to_threshold(pseudo), None, None


def _window_candidates(
    hidden_pre: Tensor, threshold: Tensor, bandwidth: float, scratch: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(flat indices, latent indices, values, inside) for the entries of hidden_pre
    [batch, d_sae] (contiguous) near their threshold, using `scratch` (same shape) as working
    memory; inside marks those where rect((h - theta) / eps) = 1.

    Few entries lie within eps / 2 of their threshold, so they are kept as index lists. The
    dense pass only keeps candidates with |fl(h - theta)| <= eps, a superset of the window (the
    exact test implies |fl(h - theta)| < eps / 2 up to one rounding); the candidates then take
    the exact test, with the same floating-point operations as `_kernel`.
    """
    torch.sub(hidden_pre, threshold, out=scratch).abs_().le_(bandwidth)
    flat = torch.nonzero(scratch.view(-1)).squeeze(1)
    cols = flat.remainder(hidden_pre.shape[-1])
    values = torch.take(hidden_pre, flat)
    inside = ((values - threshold[cols]) / bandwidth).abs() < 0.5
    return flat, cols, values, inside


class JumpReLUWithL0(torch.autograd.Function):
    """A JumpReLU SAE's training latents and L0, with the gradients of `JumpReLUFunction`
    applied to ReLU(h) and of `StepFunction` applied to h, in few passes over [batch, d_sae].

    latents = ReLU(h) * 1[ReLU(h) > theta] = h * 1[h > max(theta, 0)]
    l0 = mean over tokens of sum_i 1[h_i > theta_i] (zero, without gradient, unless with_l0)

    Every separate element-wise operation on a [batch, d_sae] tensor is a pass over memory,
    and every new tensor of that size costs page faults, so: the latents overwrite
    `hidden_pre` (returned, marked dirty; nothing else needs the pre-activations), the 0/1 mask
    becomes the input gradient in place, and the straight-through windows, shared by both
    threshold gradients, are found once and kept as index lists.
    """

    @staticmethod
    def forward(
        ctx: Any, hidden_pre: Tensor, threshold: Tensor, bandwidth: float, with_l0: bool,
        ste_to_input: bool = False, pre_act_weights: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        if not hidden_pre.is_contiguous():
            raise ValueError("JumpReLUWithL0 needs contiguous pre-activations [batch, d_sae]")
        mask = torch.empty_like(hidden_pre)
        n_tokens = hidden_pre.shape[0]
        floor = threshold.clamp_min(0)
        ctx.pre_act_weights = pre_act_weights
        if pre_act_weights is None:
            pre_act = hidden_pre.new_zeros(())
            ctx.mark_non_differentiable(pre_act)
        else:  # sum_i w_i ReLU(max(theta_i, 0) - h_i), mean over tokens; `mask` as scratch
            torch.sub(floor, hidden_pre, out=mask).clamp_(min=0)
            pre_act = (column_sums(mask) * pre_act_weights).sum() / n_tokens
        flat, cols, values, inside = _window_candidates(hidden_pre, threshold, bandwidth, mask)
        # Where h > 0, ReLU(h) = h and both windows agree; where h <= 0, ReLU(h) = 0, which is
        # in the JumpReLU window exactly for the latents with |theta| < eps / 2 (few, if any).
        ctx.flat, ctx.cols = flat, cols
        ctx.in_jump_window = (inside & (values > 0)).to(hidden_pre.dtype)
        zero_inside = ((torch.zeros_like(threshold) - threshold) / bandwidth).abs() < 0.5
        ctx.zero_cols = zero_inside.nonzero().squeeze(1)
        ctx.at_zero = hidden_pre[:, ctx.zero_cols] <= 0 if ctx.zero_cols.numel() else None
        ctx.step_counts = ctx.in_step_window = None
        if with_l0:  # float32: exact counts even for a half-precision SAE
            counts = torch.zeros(threshold.shape, device=threshold.device, dtype=torch.float32)
            ctx.step_counts = counts.index_add_(0, cols, inside.to(torch.float32))
            if ste_to_input:
                ctx.in_step_window = inside.to(hidden_pre.dtype)
        ctx.ste_to_input = ste_to_input

        torch.gt(hidden_pre, floor, out=mask)
        if pre_act_weights is not None:  # tokens with h <= max(theta, 0), per latent
            ctx.below_counts = n_tokens - column_sums(mask)
        if not with_l0:
            l0 = hidden_pre.new_zeros(())
            ctx.mark_non_differentiable(l0)
        else:
            fired = mask if bool((threshold >= 0).all()) else (hidden_pre > threshold)
            wide = torch.promote_types(hidden_pre.dtype, torch.float32)  # counts overflow fp16
            l0 = (_count(fired).to(wide) / n_tokens).to(hidden_pre.dtype)
        hidden_pre.mul_(mask)
        ctx.mark_dirty(hidden_pre)
        ctx.save_for_backward(threshold)
        ctx.mask, ctx.bandwidth, ctx.n_tokens = mask, bandwidth, n_tokens
        return hidden_pre, l0, pre_act

    @staticmethod
    def backward(
        ctx: Any, grad_latents: Tensor, grad_l0: Tensor, grad_pre_act: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None, None, None, None]:
        if ctx.mask is None:
            raise RuntimeError(
                "JumpReLUWithL0 reuses its saved mask as the input gradient, so it supports "
                "a single backward pass (no retain_graph)"
            )
        mask, ctx.mask = ctx.mask, None
        (threshold,) = ctx.saved_tensors
        weights = ctx.pre_act_weights
        # d pre_act / d h = -w_i / n_tokens where h <= max(theta, 0), i.e. where mask is 0
        push = None if weights is None else grad_pre_act * weights / ctx.n_tokens
        grad_h = None
        if ctx.needs_input_grad[0]:
            if push is None:
                grad_h = mask.mul_(grad_latents)
            else:  # mask * g - (1 - mask) * push
                grad_h = (grad_latents + push).mul_(mask).sub_(push)
        bandwidth = ctx.bandwidth
        # JumpReLU: d f / d theta ~ -(theta / eps) rect((ReLU(h) - theta) / eps) (per entry,
        # before the threshold's own factor); its negation is d f / d h with ste_to_input.
        jump = torch.take(grad_latents, ctx.flat) * ctx.in_jump_window / bandwidth
        # L0: d H(h - theta) / d theta ~ -(1 / eps) rect((h - theta) / eps), and
        # d l0 / d H = 1 / n_tokens for every entry
        per_entry = grad_l0 / (ctx.n_tokens * bandwidth)
        if grad_h is not None and ctx.ste_to_input:
            into_h = jump * threshold[ctx.cols]
            if ctx.in_step_window is not None:
                into_h = into_h + per_entry * ctx.in_step_window
            grad_h.view(-1).index_add_(0, ctx.flat, into_h)
        grad_threshold = None
        if ctx.needs_input_grad[1]:
            window_sum = torch.zeros_like(threshold).index_add_(0, ctx.cols, jump)
            if ctx.at_zero is not None:
                at_zero = grad_latents[:, ctx.zero_cols] * ctx.at_zero / bandwidth
                window_sum.index_add_(0, ctx.zero_cols, at_zero.sum(dim=0))
            grad_threshold = -threshold * window_sum
            if ctx.step_counts is not None:
                grad_threshold = grad_threshold - per_entry * ctx.step_counts.to(threshold.dtype)
            if push is not None:
                grad_threshold = grad_threshold + push * ctx.below_counts * (threshold >= 0)
        return grad_h, grad_threshold, None, None, None, None


class TanhPenalty(torch.autograd.Function):
    """mean over tokens of sum_i tanh(c * f_i * w_i), for latents f [batch, d_sae] and
    per-latent weights w [d_sae] (the decoder norms), with one [batch, d_sae] temporary: the
    tanh values, which become 1 - tanh^2 and then the latents' gradient in place."""

    @staticmethod
    def forward(ctx: Any, latents: Tensor, weights: Tensor, scale: float) -> Tensor:
        values = torch.mul(latents, scale).mul_(weights).tanh_()
        ctx.save_for_backward(latents, weights)
        ctx.values, ctx.scale = values, scale
        return column_sums(values).sum() / latents.shape[0]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        if ctx.values is None:
            raise RuntimeError("TanhPenalty reuses its buffer for gradients: one backward only")
        slope, ctx.values = ctx.values, None
        latents, weights = ctx.saved_tensors
        slope.mul_(slope).neg_().add_(1)  # d tanh(u) / du = 1 - tanh(u)^2
        per_token = grad * ctx.scale / latents.shape[0]
        grad_weights = per_token * _column_dots(latents, slope) if ctx.needs_input_grad[1] else None
        grad_latents = slope.mul_(per_token * weights) if ctx.needs_input_grad[0] else None
        return grad_latents, grad_weights, None


def _column_dots(a: Tensor, b: Tensor) -> Tensor:
    """sum over rows of a * b, for a, b [n, d], a block of rows at a time so that the product
    never needs a full [n, d] tensor (which would page fault)."""
    block = max(1, 2**20 // a.shape[1])
    out = a.new_zeros(a.shape[1])
    for start in range(0, a.shape[0], block):
        out += column_sums(a[start : start + block] * b[start : start + block])
    return out


def _count(fired: Tensor) -> Tensor:
    """Number of nonzero entries of a 0/1 (or boolean) tensor [batch, d_sae] (int64).

    For float32/64, per-latent counts (exact, each at most batch) by a vector-matrix product,
    many times faster on CPU than count_nonzero on floats, then an exact integer total."""
    if fired.dtype in (torch.float32, torch.float64):
        return column_sums(fired).long().sum()
    return torch.count_nonzero(fired)
