"""Starting points and constraints that depend on data: the decoder bias and decoder-row norms."""

from __future__ import annotations

import torch
from torch import Tensor

from saekit.saes.base import SAE, firing_points


@torch.no_grad()
def geometric_median(points: Tensor, max_iter: int = 100, tol: float = 1e-6) -> Tensor:
    """The point minimising the summed Euclidean distance to `points` [n, d] (Weiszfeld).

    Unlike the mean it is not dragged by a few far-out activations (massive-norm tokens).
    """
    points = points.to(torch.float64)
    median = points.mean(dim=0)
    for _ in range(max_iter):
        dist = (points - median).norm(dim=1).clamp_min(1e-12)  # [n]
        weights = 1.0 / dist
        new = (weights[:, None] * points).sum(dim=0) / weights.sum()
        moved = (new - median).norm()
        median = new
        if moved <= tol * max(float(median.norm()), 1.0):
            break
    return median


@torch.no_grad()
def initialize_b_dec(sae: SAE, mode: str, target: Tensor) -> None:
    """Set b_dec from a sample of what the SAE reconstructs (`target` [n, d_out])."""
    if mode == "zeros":
        sae.b_dec.zero_()
        return
    # [n, *b_dec.shape]: a b_dec with one row per layer gets each layer's own statistic.
    sample = target.reshape(-1, *sae.b_dec.shape)
    if mode == "mean":
        value = sample.to(torch.float64).mean(dim=0)
    elif mode == "geometric_median":
        rows = sample.reshape(sample.shape[0], -1, sample.shape[-1])  # [n, groups, d_out]
        value = torch.stack([geometric_median(rows[:, g]) for g in range(rows.shape[1])])
        value = value.reshape(sae.b_dec.shape)
    else:
        raise ValueError(f"b_dec_init {mode!r} is not one of zeros, mean, geometric_median")
    sae.b_dec.copy_(value.to(sae.b_dec.dtype))


@torch.no_grad()
def start_firing_at(sae: SAE, centred: Tensor, l0: float) -> None:
    """Set every latent's bias (or threshold) so that it fires on l0 / d_sae of a batch of
    encoder inputs (`centred` [batch, d_in]): the SAE starts at the wanted L0 instead of at
    the thousand-odd latents per token of a fresh one, which the sparsity penalty would
    otherwise have to silence first (silencing many of them for good)."""
    latents = torch.arange(sae.cfg.d_sae * sae.latent_groups, device=sae.device)
    products = sae.encoder_products(centred)  # [batch, latents]
    sae.set_firing_point(latents, firing_points(products, l0 / sae.cfg.d_sae))


@torch.no_grad()
def normalize_decoder_rows(sae: SAE) -> None:
    """Scale every decoder row to unit norm (the unit-norm constraint's projection)."""
    sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def remove_parallel_gradient(sae: SAE) -> None:
    """Remove from each decoder row's gradient its component along the row, so that a step
    changes the row's direction, not its length (which normalisation would undo anyway)."""
    grad = sae.W_dec.grad
    if grad is None:
        return
    rows = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)  # [d_sae, d_out]
    grad -= (grad * rows).sum(dim=1, keepdim=True) * rows


class UnitNormDecoder:
    """The unit-norm rule for decoder rows, whole: rows start at unit norm, each gradient
    loses its component along its row (a step turns a row, it does not stretch it), and
    rows are put back to unit norm after every step."""

    @staticmethod
    def applies(decoder_norm: str, sae: SAE) -> bool:
        """Whether the rule holds for `sae` under the `decoder_norm` setting: always for
        "unit", never for "free", and for "auto" as the architecture declares (not when
        latents are ranked by activation times row norm, which unit rows would void)."""
        if decoder_norm != "auto":
            return decoder_norm == "unit"
        return sae.unit_norm_decoder and not sae.cfg.rescale_acts_by_decoder_norm

    start = staticmethod(normalize_decoder_rows)
    project_gradient = staticmethod(remove_parallel_gradient)
    after_step = staticmethod(normalize_decoder_rows)
