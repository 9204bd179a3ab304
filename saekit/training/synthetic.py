"""Synthetic activations with known sparse features, for testing trainers and tuning settings.

Each token is a sparse non-negative combination of fixed unit-norm feature directions, the
generative model SAEs assume, so a trained SAE can be scored against the truth. The stream is
deterministic given its seed and resumable (`state_dict` / `load_state_dict`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor


class SparseFeatureStream(Iterator[Tensor]):
    """Batches [batch_size, d] of x = sum_i a_i * feature_i (+ an optional offset and noise).

    Feature i fires with probability `p_i` (spread log-uniformly between p_min and p_max, as
    feature frequencies are in real models); its magnitude is uniform in [0.5, 1.5].
    With `d_out`, batches are pairs (x, y) with y = x @ `mixing` [d, d_out], for transcoders.
    """

    def __init__(
        self,
        d: int,
        n_features: int,
        batch_size: int,
        *,
        p_min: float = 0.01,
        p_max: float = 0.1,
        noise: float = 0.0,
        offset: float = 0.0,
        d_out: int | None = None,
        seed: int = 0,
    ) -> None:
        if not 0 < p_min <= p_max <= 1:
            raise ValueError(f"need 0 < p_min <= p_max <= 1, got {p_min}, {p_max}")
        setup = torch.Generator().manual_seed(seed)
        features = torch.randn(n_features, d, generator=setup)
        self.features = features / features.norm(dim=1, keepdim=True)  # [n_features, d]
        log_p = torch.linspace(torch.tensor(p_min).log(), torch.tensor(p_max).log(), n_features)
        self.probabilities = log_p.exp()  # [n_features]
        self.offset = offset * torch.randn(d, generator=setup)
        self.mixing = None
        if d_out is not None:
            self.mixing = torch.randn(d, d_out, generator=setup) / d**0.5
        self.batch_size = batch_size
        self.noise = noise
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.batches = 0

    def __iter__(self) -> SparseFeatureStream:
        return self

    def __next__(self) -> Any:
        x = self.sample(self.batch_size, self.generator)
        self.batches += 1
        if self.mixing is not None:
            return x, x @ self.mixing
        return x

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n tokens [n, d] drawn with `generator` (a fresh one seeded 12345 if None)."""
        if generator is None:
            generator = torch.Generator().manual_seed(12345)
        n_features = self.features.shape[0]
        fires = torch.rand(n, n_features, generator=generator) < self.probabilities
        magnitude = 0.5 + torch.rand(n, n_features, generator=generator)
        x = (fires * magnitude) @ self.features + self.offset
        if self.noise > 0:
            x = x + self.noise * torch.randn(x.shape, generator=generator)
        return x

    def held_out(self, n: int, seed: int = 12345) -> Any:
        """n tokens the stream never yields in training (drawn from a separate generator)."""
        x = self.sample(n, torch.Generator().manual_seed(seed))
        return (x, x @ self.mixing) if self.mixing is not None else x

    @property
    def expected_l0(self) -> float:
        """Mean number of active ground-truth features per token."""
        return float(self.probabilities.sum())

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.batches = int(state["batches"])
