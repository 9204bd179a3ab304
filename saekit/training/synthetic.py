"""Training on synthetic activations with known sparse features.

`SparseFeatureStream`: a deterministic, resumable stream for testing the trainer and tuning
its settings. `run_synthetic`: the recovery benchmark (`saekit synthetic`): SAEs of any
architectures trained side by side with the usual trainer on `saekit.evals.synthetic`'s
features, then scored by `saekit.evals.ground_truth`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saekit.config import SAEMetadata
from saekit.evals.ground_truth import (
    RecoveryScores,
    SyntheticConfig,
    sample_seeds,
    score_saes,
    synthetic_result,
)
from saekit.evals.results import EvalResult
from saekit.evals.synthetic import FeatureSampler
from saekit.saes import architecture_class
from saekit.saes.base import SAE
from saekit.training.config import TrainingSection
from saekit.training.trainer import SAEJob, Trainer


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


# ----- training SAEs on known features and scoring their recovery -----------------------


@dataclass
class SyntheticRun:
    """What `run_synthetic` produced."""

    sampler: FeatureSampler
    """The drawn ground truth."""
    saes: dict[str, SAE]
    """The trained SAEs by architecture (published form: loads and saves as usual)."""
    scores: dict[str, RecoveryScores]
    results: dict[str, EvalResult]
    """Each SAE's scores as an EvalResult (SAEBench's result layout)."""


def train_synthetic(
    sampler: FeatureSampler, config: SyntheticConfig, progress: bool | None = None
) -> dict[str, SAE]:
    """Train one SAE per architecture of `config` on batches drawn from `sampler`, all in one
    Trainer (so they see the same batches); returns them by architecture."""
    c = sampler.config
    d_sae, target = config.width(), config.l0_target(sampler)
    train_seed, _ = sample_seeds(config.seed)
    # The run's rule: inputs scaled to norm sqrt(d) on average while training, folded in after.
    probe = sampler.sample(4 * config.batch_size, train_seed + 7919).x
    mean_norm = float(probe.norm(dim=1).mean())
    if not mean_norm > 0:
        raise ValueError("the synthetic samples are all zero; raise firing_max or add noise")
    scale = math.sqrt(c.d) / mean_norm
    jobs = []
    for index, name in enumerate(config.architectures):
        cls = architecture_class(name)
        uses_k = cls.sparsity_control == "k"
        l0 = float(max(1, int(target))) if uses_k else target
        if uses_k and l0 > d_sae:
            raise ValueError(f"k={int(l0)} is larger than d_sae={d_sae}; lower target_l0")
        fields = cls.config_defaults(c.d, d_sae, l0)
        meta = SAEMetadata(model_name="synthetic", hook_name="synthetic",
                           dataset_path="synthetic", extra={"synthetic": dataclasses.asdict(c)})
        torch.manual_seed(config.seed * 1000 + index)
        sae = SAE.create(name, c.d, d_sae, metadata=meta, device=config.device, **fields)
        training = TrainingSection(
            tokens=config.training_tokens, batch_size=config.batch_size, target_l0=l0,
            lr=config.lr, **config.training,
        )
        jobs.append(SAEJob(sae, training, name=name, norm_scale=scale))
    stream = sampler.activations(config.batch_size, train_seed)
    trainer = Trainer(jobs, stream, progress=progress is not False)
    fitted = trainer.fit()
    return {name: fitted.saes[name].eval() for name in config.architectures}


def run_synthetic(
    config: SyntheticConfig | None = None, progress: bool | None = None
) -> SyntheticRun:
    """Draw the ground truth, train an SAE per architecture on it and score each one."""
    config = config or SyntheticConfig()
    sampler = config.features.sampler(config.device)
    saes = train_synthetic(sampler, config, progress)
    scores = score_saes(saes, sampler, config, progress)
    results = {name: synthetic_result(s, config) for name, s in scores.items()}
    return SyntheticRun(sampler, saes, scores, results)
