"""Sparse encode/decode for top-k style SAEs.

After the encoder's dense matmul only the selected latents matter. Given which (token, latent)
pairs were selected, this computes the reconstruction by gathering decoder rows instead of a
dense [d_sae, d_in] matmul, and its backward touches only the selected latents' decoder rows
and encoder columns. `sparse_decode` is the fast path; `dense_decode` is its eager twin, with
the same inputs and outputs, used by the tests as the reference.

Selections are given in coordinate form: `token` [nnz] and `latent` [nnz] index pairs, which
covers per-token top-k (k pairs per token) and batch top-k (any number per token) alike.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

#: Largest [pairs, width] temporary the backward materialises at once (elements).
_CHUNK_ELEMENTS = 1 << 24


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,  # [batch, d_in], the centred input
        W_enc: Tensor,  # [d_in, d_sae]
        b_enc: Tensor,  # [d_sae]
        W_dec: Tensor,  # [d_sae, d_out]
        b_dec: Tensor,  # [d_out]
        token: Tensor,  # [nnz]
        latent: Tensor,  # [nnz]
        values: Tensor,  # [nnz], the selected pre-activations (already computed, detached)
    ) -> tuple[Tensor, Tensor]:
        recon = b_dec.expand(x.shape[0], -1).clone()  # [batch, d_out]
        for lo, hi in _chunks(token.numel(), W_dec.shape[1]):
            rows = W_dec[latent[lo:hi]] * values[lo:hi, None]  # [chunk, d_out]
            recon.index_add_(0, token[lo:hi], rows)
        ctx.save_for_backward(x, W_enc, W_dec, token, latent, values)
        ctx.mark_non_differentiable(token, latent)
        return recon, values.clone()

    @staticmethod
    def backward(ctx: Any, grad_recon: Tensor, grad_values_out: Tensor | None) -> tuple:
        x, W_enc, W_dec, token, latent, values = ctx.saved_tensors
        need_x, need_w_enc, need_b_enc, need_w_dec, need_b_dec = ctx.needs_input_grad[:5]
        # dL/dvalue for each selected pair = <grad_recon[token], W_dec[latent]> (+ direct use).
        grad_values = torch.empty_like(values)
        for lo, hi in _chunks(token.numel(), W_dec.shape[1]):
            grad_values[lo:hi] = (grad_recon[token[lo:hi]] * W_dec[latent[lo:hi]]).sum(-1)
        if grad_values_out is not None:
            grad_values = grad_values + grad_values_out
        # The selected values are ReLU outputs: no gradient where the ReLU was closed.
        grad_values = grad_values * (values > 0)

        grad_w_dec = grad_w_enc_t = grad_x = None
        if need_w_dec:
            grad_w_dec = torch.zeros_like(W_dec)
            for lo, hi in _chunks(token.numel(), W_dec.shape[1]):
                outer = grad_recon[token[lo:hi]] * values[lo:hi, None]  # [chunk, d_out]
                grad_w_dec.index_add_(0, latent[lo:hi], outer)
        if need_w_enc:
            grad_w_enc_t = x.new_zeros(W_enc.shape[1], W_enc.shape[0])  # [d_sae, d_in]
            for lo, hi in _chunks(token.numel(), x.shape[1]):
                outer = x[token[lo:hi]] * grad_values[lo:hi, None]  # [chunk, d_in]
                grad_w_enc_t.index_add_(0, latent[lo:hi], outer)
        if need_x:
            w_enc_t = W_enc.t()
            grad_x = torch.zeros_like(x)
            for lo, hi in _chunks(token.numel(), x.shape[1]):
                rows = w_enc_t[latent[lo:hi]] * grad_values[lo:hi, None]  # [chunk, d_in]
                grad_x.index_add_(0, token[lo:hi], rows)
        grad_b_enc = None
        if need_b_enc:
            grad_b_enc = x.new_zeros(W_enc.shape[1])
            grad_b_enc.index_add_(0, latent, grad_values)
        grad_b_dec = grad_recon.sum(0) if need_b_dec else None
        grad_w_enc = grad_w_enc_t.t() if grad_w_enc_t is not None else None
        return grad_x, grad_w_enc, grad_b_enc, grad_w_dec, grad_b_dec, None, None, None


def _chunks(total: int, width: int) -> list[tuple[int, int]]:
    step = max(1, _CHUNK_ELEMENTS // max(1, width))
    return [(lo, min(lo + step, total)) for lo in range(0, total, step)] or [(0, 0)]


def sparse_decode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    hidden_pre: Tensor,
    token: Tensor,
    latent: Tensor,
) -> tuple[Tensor, Tensor]:
    """(recon [batch, d_out], values [nnz]) for the selected (token, latent) pairs.

    `hidden_pre` [batch, d_sae] = x @ W_enc + b_enc, computed without gradient: the values are
    read from it, and gradients flow to W_enc, b_enc (and x) through the selected pairs only.
    """
    values = torch.relu(hidden_pre.detach()[token, latent])
    return _SparseDecode.apply(x, W_enc, b_enc, W_dec, b_dec, token, latent, values)


def dense_decode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    hidden_pre: Tensor,
    token: Tensor,
    latent: Tensor,
) -> tuple[Tensor, Tensor]:
    """The eager reference for `sparse_decode`: dense matmuls and autograd."""
    del hidden_pre  # recomputed with gradient
    hidden = torch.relu(x @ W_enc + b_enc)  # [batch, d_sae]
    mask = torch.zeros_like(hidden, dtype=torch.bool)
    mask[token, latent] = True
    latents = hidden * mask
    return latents @ W_dec + b_dec, latents[token, latent]


def encoder_pre_activations(x: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
    """x @ W_enc + b_enc without recording a graph: the sparse backward replaces it."""
    with torch.no_grad():
        return torch.addmm(b_enc, x, W_enc)


def topk_pairs(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(token, latent) pairs of each row's k largest scores [batch, d_sae]."""
    latent = scores.topk(k, dim=-1, sorted=False).indices  # [batch, k]
    token = torch.arange(scores.shape[0], device=scores.device).repeat_interleave(k)
    return token, latent.flatten()


def batch_topk_pairs(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(token, latent) pairs of the k * batch largest scores of the whole batch."""
    keep = min(k * scores.shape[0], scores.numel())
    flat = scores.flatten().topk(keep, sorted=False).indices
    return flat // scores.shape[1], flat % scores.shape[1]


def scatter_latents(
    batch: int, d_sae: int, token: Tensor, latent: Tensor, values: Tensor
) -> Tensor:
    """Dense latents [batch, d_sae] from pairs (for metrics; carries the values' gradient)."""
    dense = values.new_zeros(batch, d_sae)
    return dense.index_put((token, latent), values)
