"""Streaming, float64 accumulators for the evaluation metrics (docs/evaluation.md defines each).

Each accumulator takes batches of already-masked tokens (special tokens removed) and keeps
running sums in float64, so a metric over many batches equals the metric over their
concatenation: nothing is an average of per-batch averages unless the definition says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: A latent is "dense" when it fires on more than this fraction of evaluation tokens.
DENSE_FIRING_FRACTION = 0.1
#: Norms below this count as zero when dividing (cosine similarity, l2 ratio).
_NORM_EPS = 1e-12


def _f64(t: Tensor) -> Tensor:
    return t.detach().to(torch.float64)


def _check_pair(x: Tensor, recon: Tensor) -> None:
    if x.shape != recon.shape or x.ndim != 2:
        raise ValueError(
            f"expected original and reconstruction of the same shape [tokens, d], got "
            f"{tuple(x.shape)} and {tuple(recon.shape)}"
        )


@dataclass
class ReconstructionStats:
    """Reconstruction-quality metrics over all tokens seen."""

    n_tokens: int
    mse: float
    explained_variance: float
    cos_sim: float
    l2_ratio: float
    relative_reconstruction_bias: float
    l2_norm_in: float
    """Mean ||x|| over tokens."""
    l2_norm_out: float
    """Mean ||x^|| over tokens."""


class ReconstructionAccumulator:
    """Accumulates ||x - x^||^2, cosine, norm ratio and the variance of x about its mean.

    The variance uses Chan et al.'s pairwise update (per-batch mean and sum of squared
    deviations, merged), which stays accurate when the mean is large compared with the spread,
    as it is in residual streams; E||x||^2 - ||E x||^2 would cancel catastrophically there.
    """

    def __init__(self) -> None:
        self.n = 0
        self._sq_err = 0.0  # sum over tokens of ||x - x^||^2
        self._mean: Tensor | None = None  # [d] running mean of x
        self._m2 = 0.0  # sum over tokens of ||x - mean||^2
        self._cos = 0.0
        self._ratio = 0.0
        self._recon_sq = 0.0  # sum ||x^||^2
        self._dot = 0.0  # sum <x, x^>
        self._norm_in = 0.0  # sum ||x||
        self._norm_out = 0.0  # sum ||x^||

    def update(self, x: Tensor, recon: Tensor) -> None:
        """Add tokens: x and recon are [tokens, d] (the original and its reconstruction)."""
        _check_pair(x, recon)
        n_b = x.shape[0]
        if n_b == 0:
            return
        x, recon = _f64(x), _f64(recon)
        self._sq_err += float((x - recon).pow(2).sum())
        x_norm = x.norm(dim=-1)  # [tokens]
        r_norm = recon.norm(dim=-1)
        dot = (x * recon).sum(dim=-1)
        self._cos += float((dot / (x_norm * r_norm).clamp_min(_NORM_EPS)).sum())
        self._ratio += float((r_norm / x_norm.clamp_min(_NORM_EPS)).sum())
        self._recon_sq += float(r_norm.pow(2).sum())
        self._dot += float(dot.sum())
        self._norm_in += float(x_norm.sum())
        self._norm_out += float(r_norm.sum())

        mean_b = x.mean(dim=0)  # [d]
        m2_b = float((x - mean_b).pow(2).sum())
        if self._mean is None:
            self._mean, self._m2 = mean_b, m2_b
        else:
            n_a = self.n
            total = n_a + n_b
            delta = mean_b - self._mean.to(mean_b.device)
            self._m2 += m2_b + float(delta.pow(2).sum()) * n_a * n_b / total
            self._mean = self._mean.to(mean_b.device) + delta * (n_b / total)
        self.n += n_b

    @property
    def total_variance(self) -> float:
        """E||x - E x||^2: the variance of x about its mean, summed over features."""
        return self._m2 / self.n if self.n else float("nan")

    def result(self) -> ReconstructionStats:
        n = self.n
        if n == 0:
            raise ValueError("no tokens were evaluated (all masked, or empty data)")
        mse = self._sq_err / n
        var = self.total_variance
        return ReconstructionStats(
            n_tokens=n,
            mse=mse,
            explained_variance=1.0 - mse / var if var > 0 else float("nan"),
            cos_sim=self._cos / n,
            l2_ratio=self._ratio / n,
            relative_reconstruction_bias=(
                self._recon_sq / self._dot if self._dot != 0 else float("nan")
            ),
            l2_norm_in=self._norm_in / n,
            l2_norm_out=self._norm_out / n,
        )


@dataclass
class SparsityStats:
    """Sparsity metrics and per-latent statistics over all tokens seen."""

    n_tokens: int
    l0: float
    l1: float
    dead_fraction: float
    dense_fraction: float
    firing_frequency: Tensor
    """[d_sae] fraction of tokens on which each latent is non-zero."""
    mean_activation_when_firing: Tensor
    """[d_sae] mean of each latent's value over the tokens where it fires (0 if it never does)."""
    max_activation: Tensor
    """[d_sae] largest value each latent takes (0 if it never fires)."""
    sequences_fired: Tensor | None = None
    """[d_sae] how many sequences each latent fires in (when sequences were counted)."""


class SparsityAccumulator:
    """Accumulates L0, L1 and per-latent firing counts, activation sums and maxima."""

    def __init__(self, d_sae: int, dense_threshold: float = DENSE_FIRING_FRACTION) -> None:
        if d_sae <= 0:
            raise ValueError(f"d_sae must be positive, got {d_sae}")
        self.d_sae = d_sae
        self.dense_threshold = dense_threshold
        self.n = 0
        self._fires = torch.zeros(d_sae, dtype=torch.int64)
        self._act_sum = torch.zeros(d_sae, dtype=torch.float64)
        self._max = torch.zeros(d_sae, dtype=torch.float64)
        self._l1 = 0.0
        self._sequences: Tensor | None = None

    def count_sequences(self, latents: Tensor, mask: Tensor) -> None:
        """Count, per latent, the sequences it fires in: latents [batch, pos, d_sae] and the
        [batch, pos] mask of evaluated positions (call alongside `update`)."""
        keep = mask.to(latents.device).unsqueeze(-1)
        fired = ((latents.detach() != 0) & keep).any(dim=1).sum(dim=0).cpu()
        self._sequences = fired if self._sequences is None else self._sequences + fired

    def update(self, latents: Tensor) -> None:
        """Add tokens: latents is [tokens, d_sae]."""
        if latents.ndim != 2 or latents.shape[1] != self.d_sae:
            raise ValueError(
                f"expected latents [tokens, {self.d_sae}], got shape {tuple(latents.shape)}"
            )
        if latents.shape[0] == 0:
            return
        latents = latents.detach()
        firing = latents != 0  # [tokens, d_sae]
        self._fires += firing.sum(dim=0).cpu()
        # Non-firing entries are zero, so the plain column sum is the sum over firing tokens.
        self._act_sum += latents.sum(dim=0, dtype=torch.float64).cpu()
        batch_max = latents.max(dim=0).values.to(torch.float64).cpu()
        self._max = torch.maximum(self._max, batch_max)
        self._l1 += float(latents.abs().sum(dtype=torch.float64))
        self.n += latents.shape[0]

    def result(self) -> SparsityStats:
        n = self.n
        if n == 0:
            raise ValueError("no tokens were evaluated (all masked, or empty data)")
        fires = self._fires.to(torch.float64)
        freq = fires / n
        mean_when_firing = torch.where(
            self._fires > 0, self._act_sum / fires.clamp_min(1), torch.zeros_like(fires)
        )
        return SparsityStats(
            n_tokens=n,
            l0=float(fires.sum()) / n,
            l1=self._l1 / n,
            dead_fraction=float((self._fires == 0).to(torch.float64).mean()),
            dense_fraction=float((freq > self.dense_threshold).to(torch.float64).mean()),
            firing_frequency=freq,
            mean_activation_when_firing=mean_when_firing,
            max_activation=self._max.clone(),
            sequences_fired=None if self._sequences is None else self._sequences.clone(),
        )


@dataclass
class DownstreamStats:
    """Next-token cross-entropy and KL figures with the hook spliced or ablated."""

    n_tokens: int
    ce_loss_without_sae: float
    ce_loss_with_sae: float
    ce_loss_with_ablation: float
    ce_loss_score: float
    kl_div_with_sae: float
    kl_div_with_ablation: float
    kl_div_score: float


class DownstreamAccumulator:
    """Sums per-token cross-entropies (clean, spliced, ablated) and KL divergences."""

    def __init__(self) -> None:
        self.n = 0
        self._ce = {"clean": 0.0, "sae": 0.0, "ablation": 0.0}
        self._kl = {"sae": 0.0, "ablation": 0.0}

    def update(
        self,
        ce_clean: Tensor,
        ce_sae: Tensor,
        ce_ablation: Tensor,
        kl_sae: Tensor,
        kl_ablation: Tensor,
    ) -> None:
        """Add tokens: each argument is a 1-D tensor of per-token values, all the same length."""
        parts = {
            "ce_clean": ce_clean,
            "ce_sae": ce_sae,
            "ce_ablation": ce_ablation,
            "kl_sae": kl_sae,
            "kl_ablation": kl_ablation,
        }
        lengths = {name: tuple(t.shape) for name, t in parts.items()}
        if len({*lengths.values()}) != 1 or ce_clean.ndim != 1:
            raise ValueError(f"expected 1-D per-token tensors of equal length, got {lengths}")
        self._ce["clean"] += float(ce_clean.sum(dtype=torch.float64))
        self._ce["sae"] += float(ce_sae.sum(dtype=torch.float64))
        self._ce["ablation"] += float(ce_ablation.sum(dtype=torch.float64))
        self._kl["sae"] += float(kl_sae.sum(dtype=torch.float64))
        self._kl["ablation"] += float(kl_ablation.sum(dtype=torch.float64))
        self.n += ce_clean.shape[0]

    def result(self) -> DownstreamStats:
        n = self.n
        if n == 0:
            raise ValueError("no tokens were evaluated for CE/KL (all masked, or empty data)")
        clean, sae, abl = (self._ce[k] / n for k in ("clean", "sae", "ablation"))
        kl_sae, kl_abl = self._kl["sae"] / n, self._kl["ablation"] / n
        return DownstreamStats(
            n_tokens=n,
            ce_loss_without_sae=clean,
            ce_loss_with_sae=sae,
            ce_loss_with_ablation=abl,
            ce_loss_score=score(abl, sae, clean),
            kl_div_with_sae=kl_sae,
            kl_div_with_ablation=kl_abl,
            kl_div_score=score(kl_abl, kl_sae, 0.0),
        )


def score(ablated: float, spliced: float, clean: float) -> float:
    """(ablated - spliced) / (ablated - clean): 1 when the splice is as good as the clean
    model, 0 when it is as bad as ablating; NaN when ablating changes nothing."""
    gap = ablated - clean
    return (ablated - spliced) / gap if gap != 0 else float("nan")
