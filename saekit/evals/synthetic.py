"""Synthetic activations built from known sparse features: the one setting where the right
answer for an SAE is known.

Each sample is x = sum_i a_i * f_i + noise, where f_i [d] are fixed unit feature directions and
a_i >= 0 is feature i's activation: zero unless the feature fires, else a random magnitude.
`SyntheticFeatures` describes the generative model (a config, validated, no randomness);
`FeatureSampler` holds what the seed drew (the directions) and samples batches of (x, a), in
chunks, so any number of samples streams in bounded memory.

Feature layout (indices into the feature axis):

- roots come first, in Zipf rank order: root r (0-based) fires with probability
  `firing_max * (r + 1) ** -zipf_exponent`;
- the first `n_parents` roots are parents; the next `n_groups * group_size` roots form the
  correlated groups (group g is the block of `group_size` roots after the parents and the
  groups before it);
- children come after the roots: child c of parent p is feature
  `n_roots + p * children_per_parent + c`. A child fires only when its parent fires, and then
  with probability `child_firing`, independently of its siblings.

Correlated groups: each feature fires when a standard normal z_i falls below the quantile of
its firing probability, so its own rate is exactly the one above; within a group the z's share
a common normal term, corr(z_i, z_j) = `group_correlation`, so members tend to fire together
(a Gaussian copula). Features outside groups draw independent z's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

DIRECTIONS = ("random", "orthogonal")
MAGNITUDES = ("uniform", "lognormal")
#: Elements of one [rows, n_features] chunk drawn at a time, which bounds memory.
CHUNK_ELEMENTS = 1 << 22


@dataclass
class SyntheticFeatures:
    """The generative model of synthetic activations (see the module docstring for layout)."""

    d: int = 64
    """Width of the activations (the SAE's d_in)."""
    n_features: int = 256
    """Number of true features, roots and children together."""
    directions: str = "random"
    """random: independent random unit vectors (nearly orthogonal when d is large);
    orthogonal: exactly orthonormal (needs n_features <= d)."""
    firing_max: float = 0.25
    """Firing probability of the most frequent root feature."""
    zipf_exponent: float = 0.5
    """Root r fires with probability firing_max * (r + 1) ** -zipf_exponent (0: all alike)."""
    magnitude: str = "uniform"
    """How large a firing feature's activation is: uniform in
    magnitude_mean * [1 - magnitude_spread, 1 + magnitude_spread], or lognormal with mean
    magnitude_mean and log-standard-deviation magnitude_spread."""
    magnitude_mean: float = 1.0
    """Mean activation of a firing feature."""
    magnitude_spread: float = 0.5
    """Spread of the activation: relative half-width (uniform, below 1) or sigma (lognormal)."""
    n_parents: int = 0
    """Root features that have children (hierarchy)."""
    children_per_parent: int = 0
    """Children of each parent; they fire only when their parent fires."""
    child_firing: float = 0.3
    """Probability that a child fires when its parent fires."""
    n_groups: int = 0
    """Groups of correlated root features."""
    group_size: int = 0
    """Features per correlated group."""
    group_correlation: float = 0.8
    """Correlation of the normal variables behind the firing of two members of a group."""
    noise: float = 0.0
    """Standard deviation of Gaussian noise added to every coordinate."""
    seed: int = 0
    """Seed of the feature directions (samples take their own seeds)."""

    @property
    def n_children(self) -> int:
        return self.n_parents * self.children_per_parent

    @property
    def n_roots(self) -> int:
        return self.n_features - self.n_children

    def problems(self) -> list[str]:
        """Every problem with the settings, each saying what to change."""
        out: list[str] = []
        lowest = {"d": 1, "n_features": 1, "n_parents": 0, "children_per_parent": 0,
                  "n_groups": 0, "group_size": 0, "seed": 0}
        for name, low in lowest.items():
            value = getattr(self, name)
            if _whole(value) < low:
                out.append(f"{name} must be a whole number of at least {low}, got {value!r}")
        ranges = {
            "firing_max": (0.0, 1.0, False), "child_firing": (0.0, 1.0, False),
            "group_correlation": (0.0, 1.0, True), "zipf_exponent": (0.0, math.inf, True),
            "magnitude_mean": (0.0, math.inf, False), "magnitude_spread": (0.0, math.inf, True),
            "noise": (0.0, math.inf, True),
        }
        for name, (low, high, low_ok) in ranges.items():
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
                math.isfinite(value) and (value >= low if low_ok else value > low)
                and value <= high
            )
            if not ok:
                bound = "[" if low_ok else "("
                upper = "]" if math.isfinite(high) else ")"
                out.append(f"{name} must be in {bound}{low:g}, {high:g}{upper}, got {value!r}")
        if self.directions not in DIRECTIONS:
            out.append(f"directions {self.directions!r} is not one of {', '.join(DIRECTIONS)}")
        if self.magnitude not in MAGNITUDES:
            out.append(f"magnitude {self.magnitude!r} is not one of {', '.join(MAGNITUDES)}")
        if out:
            return out  # the checks below assume numbers of the right kind
        if self.magnitude == "uniform" and self.magnitude_spread > 1:
            out.append(
                f"magnitude_spread {self.magnitude_spread:g} above 1 would make uniform "
                "magnitudes negative; use at most 1, or magnitude lognormal"
            )
        if self.directions == "orthogonal" and self.n_features > self.d:
            out.append(
                f"{self.n_features} orthogonal directions do not fit in d={self.d}; use "
                "n_features <= d, or directions random"
            )
        if (self.n_parents == 0) != (self.children_per_parent == 0):
            out.append("a hierarchy needs both n_parents and children_per_parent above 0")
        if (self.n_groups == 0) != (self.group_size == 0):
            out.append("correlated groups need both n_groups and group_size above 0")
        elif self.n_groups and self.group_size < 2:
            out.append(f"a correlated group needs at least 2 features, got {self.group_size}")
        used = self.n_parents + self.n_groups * self.group_size
        if self.n_roots < 1 or used > self.n_roots:
            out.append(
                f"{self.n_parents} parents with {self.n_children} children and "
                f"{self.n_groups} groups of {self.group_size} need at least "
                f"{used + self.n_children} features, got n_features={self.n_features}"
            )
        return out

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    def sampler(self, device: str | torch.device = "cpu") -> FeatureSampler:
        """Draw the directions from `seed` and return the sampler."""
        return FeatureSampler(self, device)


class SyntheticBatch(NamedTuple):
    """Samples and their ground truth."""

    x: Tensor
    """[n, d] activations."""
    features: Tensor
    """[n, n_features] true feature activations (0 where a feature does not fire)."""


class FeatureSampler:
    """The drawn generative model: directions, firing probabilities, hierarchy and groups.

    Samples are drawn on the CPU with a seeded generator (so the same seed gives the same
    samples on any machine) and moved to `device`.
    """

    def __init__(self, config: SyntheticFeatures, device: str | torch.device = "cpu") -> None:
        self.config = c = config
        self.device = torch.device(device)
        setup = torch.Generator().manual_seed(c.seed)
        if c.directions == "orthogonal":
            q, _ = torch.linalg.qr(torch.randn(c.d, c.n_features, generator=setup))
            directions = q.T  # [n_features, d], orthonormal rows
        else:
            directions = torch.randn(c.n_features, c.d, generator=setup)
        self.directions = directions / directions.norm(dim=1, keepdim=True)  # [n_features, d]

        ranks = torch.arange(1, c.n_roots + 1, dtype=torch.float64)
        roots = c.firing_max * ranks.pow(-c.zipf_exponent)
        children = torch.full((c.n_children,), c.child_firing, dtype=torch.float64)
        #: [n_features] firing probability; for children, given that the parent fires.
        self.probabilities = torch.cat([roots, children])
        #: [n_features] each feature's parent, -1 for roots.
        self.parent = torch.full((c.n_features,), -1, dtype=torch.long)
        self.parent[c.n_roots:] = torch.arange(c.n_parents).repeat_interleave(
            c.children_per_parent
        )
        #: [n_features] each feature's correlated group, -1 outside groups.
        self.group = torch.full((c.n_features,), -1, dtype=torch.long)
        grouped = slice(c.n_parents, c.n_parents + c.n_groups * c.group_size)
        self.group[grouped] = torch.arange(c.n_groups).repeat_interleave(c.group_size)

    @property
    def marginal_probabilities(self) -> Tensor:
        """[n_features] probability that each feature fires (a child's includes its parent)."""
        p = self.probabilities.clone()
        children = self.parent >= 0
        p[children] = p[children] * self.probabilities[self.parent[children]]
        return p

    @property
    def expected_l0(self) -> float:
        """Expected number of firing features per sample."""
        return float(self.marginal_probabilities.sum())

    def sample(self, n: int, seed: int | torch.Generator) -> SyntheticBatch:
        """`n` samples drawn with `seed` (or a generator, which advances)."""
        generator = seed if isinstance(seed, torch.Generator) else (
            torch.Generator().manual_seed(seed)
        )
        rows = max(1, CHUNK_ELEMENTS // self.config.n_features)
        parts = [self._chunk(min(rows, n - start), generator) for start in range(0, n, rows)]
        if not parts:
            parts = [self._chunk(0, generator)]
        x = torch.cat([p[0] for p in parts]).to(self.device)
        features = torch.cat([p[1] for p in parts]).to(self.device)
        return SyntheticBatch(x, features)

    def batches(self, batch_size: int, seed: int, n: int | None = None) -> Iterator[SyntheticBatch]:
        """Batches of `batch_size` samples from one seeded generator: `n` samples in all
        (the last batch may be smaller), or without end when `n` is None."""
        generator = torch.Generator().manual_seed(seed)
        drawn = 0
        while n is None or drawn < n:
            size = batch_size if n is None else min(batch_size, n - drawn)
            drawn += size
            yield self.sample(size, generator)

    def activations(self, batch_size: int, seed: int) -> Iterator[Tensor]:
        """Endless [batch_size, d] batches (the trainer's input)."""
        for batch in self.batches(batch_size, seed):
            yield batch.x

    def _chunk(self, m: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        c = self.config
        uniform = torch.rand(m, c.n_features, generator=generator, dtype=torch.float64)
        if c.n_groups:
            # Gaussian copula: swap each grouped feature's uniform for one whose normal
            # score shares a common term with its group's, keeping every marginal rate.
            members = self.group >= 0
            shared = torch.randn(m, c.n_groups, generator=generator, dtype=torch.float64)
            own = torch.special.ndtri(uniform[:, members].clamp(1e-12, 1 - 1e-12))
            rho = c.group_correlation
            z = math.sqrt(rho) * shared[:, self.group[members]] + math.sqrt(1 - rho) * own
            uniform[:, members] = torch.special.ndtr(z)
        fires = uniform < self.probabilities  # [m, n_features]
        children = torch.nonzero(self.parent >= 0).squeeze(1)
        if children.numel():
            fires[:, children] &= fires[:, self.parent[children]]
        if c.magnitude == "uniform":
            spread = 2 * torch.rand(m, c.n_features, generator=generator) - 1
            magnitude = c.magnitude_mean * (1 + c.magnitude_spread * spread)
        else:
            normal = torch.randn(m, c.n_features, generator=generator)
            sigma = c.magnitude_spread
            magnitude = c.magnitude_mean * torch.exp(sigma * normal - sigma**2 / 2)
        features = fires * magnitude  # [m, n_features]
        x = features @ self.directions  # [m, d]
        if c.noise > 0:
            x = x + c.noise * torch.randn(m, c.d, generator=generator)
        return x, features


def _whole(value: object) -> int:
    """The value as a whole number, or -1 when it is not one (so range checks fail)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return -1
    return value
