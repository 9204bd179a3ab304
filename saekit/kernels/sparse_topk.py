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

import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor

# CSR support is marked beta in torch; the operations used here are covered by our tests.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def _rows(index: Tensor, other: Tensor, values: Tensor, n_rows: int, n_cols: int) -> Tensor:
    """A CSR matrix [n_rows, n_cols] from entries sorted by row `index` (columns `other`)."""
    counts = torch.bincount(index, minlength=n_rows)
    crow = torch.zeros(n_rows + 1, dtype=torch.long, device=index.device)
    torch.cumsum(counts, 0, out=crow[1:])
    return torch.sparse_csr_tensor(crow, other, values, (n_rows, n_cols), check_invariants=False)


class _SparseDecode(torch.autograd.Function):
    """recon = b_dec + S @ W_dec with S the sparse [batch, d_sae] matrix of selected values.

    The backward uses sparse products only: it reads the decoder rows and writes the encoder
    columns of the selected latents, never a dense [batch, d_sae] gradient.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,  # [batch, d_in], the centred input
        W_enc: Tensor,  # [d_in, d_sae]
        b_enc: Tensor,  # [d_sae]
        W_dec: Tensor,  # [d_sae, d_out]
        b_dec: Tensor,  # [d_out]
        token: Tensor,  # [nnz], sorted ascending
        latent: Tensor,  # [nnz]
        values: Tensor,  # [nnz], the selected ReLU'd pre-activations (detached)
    ) -> tuple[Tensor, Tensor]:
        batch, d_sae = x.shape[0], W_enc.shape[1]
        selected = _rows(token, latent, values, batch, d_sae)
        recon = torch.addmm(b_dec, selected, W_dec)  # [batch, d_out]
        ctx.save_for_backward(x, W_enc, W_dec, token, latent, values)
        ctx.mark_non_differentiable(token, latent)
        return recon, values.clone()

    @staticmethod
    def backward(ctx: Any, grad_recon: Tensor, grad_values_out: Tensor | None) -> tuple:
        x, W_enc, W_dec, token, latent, values = ctx.saved_tensors
        need_x, need_w_enc, need_b_enc, need_w_dec, need_b_dec = ctx.needs_input_grad[:5]
        batch, d_sae = x.shape[0], W_enc.shape[1]
        grad_recon = grad_recon.contiguous()
        # dL/dvalue of each selected pair = <grad_recon[token], W_dec[latent]>: a product
        # sampled only where S has entries.
        pattern = _rows(token, latent, torch.ones_like(values), batch, d_sae)
        grad_values = torch.sparse.sampled_addmm(pattern, grad_recon, W_dec.t(), beta=0.0)
        grad_values = grad_values.values()
        if grad_values_out is not None:
            grad_values = grad_values + grad_values_out
        # The selected values are ReLU outputs: no gradient where the ReLU was closed.
        grad_values = grad_values * (values > 0)

        # Products with S^T: a COO matrix indexed (latent, token) needs no sorting.
        transposed = torch.stack([latent, token])
        grad_x = grad_w_enc = grad_b_enc = grad_w_dec = grad_b_dec = None
        if need_w_dec:
            s_t = torch.sparse_coo_tensor(
                transposed, values, (d_sae, batch), check_invariants=False
            )
            grad_w_dec = torch.sparse.mm(s_t, grad_recon)  # [d_sae, d_out]
        if need_w_enc:
            g_t = torch.sparse_coo_tensor(
                transposed, grad_values, (d_sae, batch), check_invariants=False
            )
            grad_w_enc = torch.sparse.mm(g_t, x).t()  # [d_in, d_sae]
        if need_x:
            g = _rows(token, latent, grad_values, batch, d_sae)
            grad_x = g @ W_enc.t().contiguous()  # [batch, d_in]
        if need_b_enc:
            grad_b_enc = torch.bincount(latent, weights=grad_values, minlength=d_sae)
            grad_b_enc = grad_b_enc.to(values.dtype)
        if need_b_dec:
            grad_b_dec = grad_recon.sum(0)
        return grad_x, grad_w_enc, grad_b_enc, grad_w_dec, grad_b_dec, None, None, None


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
    """(token, latent) pairs of each row's k largest scores [batch, d_sae], in row order."""
    latent = scores.topk(k, dim=-1, sorted=False).indices  # [batch, k]
    token = torch.arange(scores.shape[0], device=scores.device).repeat_interleave(k)
    return token, latent.flatten()


def batch_topk_pairs(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(token, latent) pairs of the k * batch largest scores of the whole batch, in row order."""
    keep = min(k * scores.shape[0], scores.numel())
    flat = scores.flatten().topk(keep, sorted=False).indices.sort().values
    return flat // scores.shape[1], flat % scores.shape[1]


class SelectedLatents(NamedTuple):
    """Training latents [batch, d_sae] kept as the selected pairs and their values.

    The dense form is a fresh [batch, d_sae] tensor written at scattered places (a page
    fault per page: at batch 4096 and 16x it cost more than the sparse decode itself), and
    the training step needs only the reconstruction and how often each latent fired."""

    token: Tensor
    latent: Tensor
    values: Tensor  # carries the gradient
    shape: tuple[int, int]

    def dense(self) -> Tensor:
        return scatter_latents(*self.shape, self.token, self.latent, self.values)

    def fire_counts(self) -> Tensor:
        """[d_sae] tokens on which each latent is nonzero."""
        return torch.bincount(self.latent[self.values.detach() != 0], minlength=self.shape[1])


def scatter_latents(
    batch: int, d_sae: int, token: Tensor, latent: Tensor, values: Tensor
) -> Tensor:
    """Dense latents [batch, d_sae] from pairs (for metrics; carries the values' gradient)."""
    dense = values.new_zeros(batch, d_sae)
    return dense.index_put((token, latent), values)
