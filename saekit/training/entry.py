"""`train`, the entry point of every run: one SAE (`saekit.training.run`), several from
one model pass (`saekit.training.many`), or one SAE over several sites, a clt or crosscoder
(`saekit.training.crosslayer_run`), as the config (or the resumed run) says."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from saekit.progress import progress_off
from saekit.training.config import TrainConfig
from saekit.training.crosslayer_run import train_multisite, trains_multisite
from saekit.training.distributed import DistEnv, destroy_process_group
from saekit.training.many import train_many
from saekit.training.run import TrainOutcome, _as_config, _train, saved_run_config


def train(
    config: TrainConfig | dict[str, Any] | str | Path | None = None,
    model: Any = None,
    dataset: Any = None,
    *,
    given: Iterable[str] | None = None,
) -> TrainOutcome:
    """Train an SAE as `config` says and write the run folder.

    Args:
        config: a TrainConfig, a dict of sections, a YAML/JSON file, or None for the demo.
        model: an in-memory model (HookedTransformer, TransformerBridge, Hugging Face model or
            backend) used instead of `config.data.model`.
        dataset: a `datasets` Dataset, a list of texts or an iterable of token tensors used
            instead of `config.data.dataset`.
        given: with `run.resume`, the settings the caller set ("training.tokens"); those
            that differ from the saved run are applied when they can change mid-run and
            refused otherwise (`resumed_config`). None: every setting not at its default.
    """
    cfg = _as_config(config)
    env = DistEnv.from_env()
    started_group = env.distributed and not torch.distributed.is_initialized()
    try:
        # run.progress covers every bar of the run (norm estimate, evaluation), on rank 0 only.
        with progress_off(not (cfg.run.progress and env.is_main)):
            if trains_multisite(cfg):
                return train_multisite(cfg, model, dataset, env, given)
            if _trains_many(cfg):
                return train_many(cfg, model, dataset, env, given)  # type: ignore[return-value]
            return _train(cfg, model, dataset, env, given)
    finally:
        if started_group:
            destroy_process_group()


def _trains_many(cfg: TrainConfig) -> bool:
    """Whether the run (or, resuming, the saved run) trains several SAEs."""
    saved = saved_run_config(cfg)
    return cfg.many or (saved is not None and saved.many)
