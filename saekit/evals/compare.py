"""Comparing two dictionaries: how much of one SAE's decoder the other has learned too.

For seed stability (two SAEs trained alike but for the seed) and width sweeps (an SAE and a
wider one). Everything is computed from decoder rows, each scaled to unit norm; cosines are
signed, since latents are non-negative and a flipped direction is a different feature.

- mean max cosine, A to B: the mean over latents of A of the largest cosine with any latent
  of B (and the same from B to A);
- matched pairs: a one-to-one matching of latents of A to latents of B that maximises the
  summed cosine (Hungarian matching, scipy's `linear_sum_assignment`), with each pair's cosine;
- splits: latents of A that B splits across several latents. Latent i of A is split when at
  least two latents of B have cosine >= `split_threshold` with it, and the sum of those latents'
  directions points closer to i than the best single one does (a duplicate copy does not).

Costs: the cosine matrix is [d_sae_a, d_sae_b] floats (64 MB for 4k x 4k) and the Hungarian
matching is cubic in the width: seconds at 4k latents, minutes at 16k.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from saekit.saes.base import SAE

#: Default cosine at or above which a matched pair counts as the same feature (Paulo &
#: Belrose 2025 call such latents shared).
MATCH_THRESHOLD = 0.7
#: Default cosine at or above which a latent of B counts as a part of a latent of A.
SPLIT_THRESHOLD = 0.5
#: How much closer the summed parts must point than the best part, so rounding never makes
#: a duplicate look like a split.
_SPLIT_GAIN = 1e-4


@dataclass
class Split:
    """A latent of A that several latents of B share."""

    latent: int
    """The latent of A."""
    parts: list[int]
    """Latents of B with cosine >= the split threshold with it, closest first."""
    cosines: list[float]
    """Each part's cosine with the latent of A."""
    combined_cosine: float
    """Cosine between the latent of A and the sum of its parts' directions."""


@dataclass
class Comparison:
    """What `compare(sae_a, sae_b)` found (see the module docstring for definitions)."""

    mean_max_cosine_a: float
    """Mean over latents of A of the largest cosine with a latent of B."""
    mean_max_cosine_b: float
    """Mean over latents of B of the largest cosine with a latent of A."""
    matched_a: Tensor
    """[n_pairs] latents of A in the Hungarian matching (n_pairs = the smaller width)."""
    matched_b: Tensor
    """[n_pairs] their partners in B."""
    matched_cosines: Tensor
    """[n_pairs] each pair's cosine."""
    match_threshold: float
    split_threshold: float
    splits: list[Split] = field(default_factory=list)

    @property
    def mean_matched_cosine(self) -> float:
        """Mean cosine over the matched pairs."""
        return float(self.matched_cosines.mean()) if self.matched_cosines.numel() else 0.0

    @property
    def shared_fraction(self) -> float:
        """Share of matched pairs whose cosine is at least `match_threshold`."""
        if not self.matched_cosines.numel():
            return 0.0
        return float((self.matched_cosines >= self.match_threshold).double().mean())

    def to_dict(self) -> dict[str, float | int]:
        """The summary numbers (JSON-ready)."""
        return {
            "mean_max_cosine_a": self.mean_max_cosine_a,
            "mean_max_cosine_b": self.mean_max_cosine_b,
            "mean_matched_cosine": self.mean_matched_cosine,
            "shared_fraction": self.shared_fraction,
            "matched_pairs": int(self.matched_cosines.numel()),
            "split_latents": len(self.splits),
        }


def unit_rows(rows: Tensor) -> Tensor:
    """Rows [n, d] scaled to unit norm, in float32 on the CPU (zero rows stay zero)."""
    rows = rows.detach().float().cpu()
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)


def hungarian(similarity: Tensor) -> tuple[Tensor, Tensor]:
    """The one-to-one matching of rows to columns of `similarity` [m, n] that maximises the
    summed similarity: (rows, cols), min(m, n) pairs, rows ascending."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(similarity.double().numpy(), maximize=True)
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


def compare(
    sae_a: SAE | Tensor,
    sae_b: SAE | Tensor,
    *,
    match_threshold: float = MATCH_THRESHOLD,
    split_threshold: float = SPLIT_THRESHOLD,
) -> Comparison:
    """Compare the decoders of two SAEs (or two [n, d] direction matrices) with the same d.

    See the module docstring for each number; `match_threshold` only sets `shared_fraction`,
    `split_threshold` the cosine a latent of B needs to count as a part of a latent of A.
    """
    for name, value in (("match_threshold", match_threshold),
                        ("split_threshold", split_threshold)):
        if not -1 <= value <= 1:
            raise ValueError(f"{name} is a cosine, between -1 and 1; got {value}")
    a, b = _directions(sae_a, "sae_a"), _directions(sae_b, "sae_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"the decoders have different widths: sae_a writes d={a.shape[1]}, sae_b "
            f"d={b.shape[1]}; compare SAEs trained on the same site"
        )
    cosines = a @ b.T  # [n_a, n_b]
    rows, cols = hungarian(cosines)
    return Comparison(
        mean_max_cosine_a=float(cosines.max(dim=1).values.mean()),
        mean_max_cosine_b=float(cosines.max(dim=0).values.mean()),
        matched_a=rows,
        matched_b=cols,
        matched_cosines=cosines[rows, cols],
        match_threshold=match_threshold,
        split_threshold=split_threshold,
        splits=_splits(a, b, cosines, split_threshold),
    )


def _splits(a: Tensor, b: Tensor, cosines: Tensor, threshold: float) -> list[Split]:
    found: list[Split] = []
    candidates = torch.nonzero((cosines >= threshold).sum(dim=1) >= 2).squeeze(1)
    for latent in candidates.tolist():
        row = cosines[latent]
        parts = torch.nonzero(row >= threshold).squeeze(1)
        parts = parts[row[parts].argsort(descending=True)]
        combined = b[parts].sum(dim=0)
        combined_cosine = float(a[latent] @ combined / combined.norm().clamp_min(1e-12))
        if combined_cosine > float(row[parts[0]]) + _SPLIT_GAIN:
            found.append(Split(latent, parts.tolist(), row[parts].tolist(), combined_cosine))
    return found


def _directions(source: SAE | Tensor, name: str) -> Tensor:
    rows = source.W_dec if isinstance(source, SAE) else source
    if not isinstance(rows, Tensor) or rows.ndim != 2 or rows.shape[0] == 0:
        raise ValueError(
            f"{name} must be an SAE or a [n, d] tensor of decoder directions with n >= 1, "
            f"got {getattr(rows, 'shape', type(rows).__name__)}"
        )
    return unit_rows(rows)
