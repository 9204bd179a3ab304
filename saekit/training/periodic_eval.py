"""Held-out evaluation during training (`run.eval_every`): every SAE of the run, on the same
fixed held-out sample each time, as it would be saved at that point.

The trainer calls a `PeriodicEval` when the token count crosses a multiple of `every`; the
figures go to log.jsonl (an "eval" record), the progress bar and Weights & Biases.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from saekit.models.backend import ModelBackend
from saekit.saes.base import SAE
from saekit.sites import SAESite

if TYPE_CHECKING:
    from saekit.training.trainer import SAEJob

log = logging.getLogger(__name__)


def heldout_sample(batches: Sequence[Tensor], tokens: int) -> list[Tensor]:
    """The first whole sequences of `batches` holding at least `tokens` tokens (all of them
    when they hold fewer): the fixed sample every periodic evaluation reads."""
    out: list[Tensor] = []
    total = 0
    for batch in batches:
        if total >= tokens:
            break
        per_row = batch.shape[1]
        rows = min(batch.shape[0], -(-(tokens - total) // per_row))
        out.append(batch[:rows])
        total += rows * per_row
    return out


@torch.no_grad()
def snapshot(job: SAEJob) -> SAE:
    """A copy of the job's SAE in the form it would be saved now: the training-time input
    scale and decoder norms folded in, so it reads the model's raw activations."""
    sae = copy.deepcopy(job.sae)
    if job.norm_scale is not None:
        sae.fold_activation_norm_scaling_factor(job.norm_scale)
    try:
        sae.fold_W_dec_norm()
    except ValueError:
        pass  # an architecture whose function folding would change: evaluated as trained
    sae = sae.published()
    sae.eval()
    return sae


class LockedSource(Iterator[Any]):
    """An activation stream whose every batch is made holding `lock`: the model is then never
    run by the prefetching thread while an evaluation splices an SAE into it (the backend's
    hooks are the model's, shared by both threads)."""

    def __init__(self, inner: Iterator[Any], lock: threading.Lock) -> None:
        self.inner, self.lock = inner, lock

    def __iter__(self) -> LockedSource:
        return self

    def __next__(self) -> Any:
        with self.lock:
            return next(self.inner)

    def __getattr__(self, name: str) -> Any:
        # state_dict / load_state_dict and the rest exactly when the stream has them.
        return getattr(self.inner, name)


class PeriodicEval:
    """Evaluate the trainer's SAEs on a fixed held-out sample every `every` tokens.

    Args:
        every: tokens between evaluations (one after each step that crosses a multiple).
        backend: the model the SAEs read.
        token_batches: the held-out sample (see `heldout_sample`), read every time.
        sites: where each SAE sits, by job name.
        downstream: compute the CE and KL figures (they need the model's logits).
        lock: held while evaluating (the one a `LockedSource` holds while making batches).
    """

    def __init__(
        self,
        every: int,
        backend: ModelBackend,
        token_batches: Sequence[Tensor],
        sites: dict[str, SAESite],
        *,
        downstream: bool = True,
        lock: threading.Lock | None = None,
    ) -> None:
        if every <= 0:
            raise ValueError(f"eval_every must be a positive number of tokens, got {every}")
        if not token_batches:
            raise ValueError("periodic evaluation needs held-out tokens; none were given")
        from saekit.evals.api import downstream_possible

        self.every = every
        self.backend = backend
        self.token_batches = list(token_batches)
        self.sites = dict(sites)
        self.downstream = downstream_possible(backend, downstream)
        self.lock = lock or threading.Lock()

    @property
    def n_tokens(self) -> int:
        return sum(int(b.numel()) for b in self.token_batches)

    def due(self, before: int, after: int) -> bool:
        """Whether a step from `before` to `after` tokens crossed a multiple of `every`."""
        return before // self.every != after // self.every

    def __call__(self, jobs: Sequence[SAEJob]) -> dict[str, dict[str, Any]]:
        """{job name: metrics} for `jobs`, all evaluated in one pass over the sample."""
        from saekit.evals.metrics import json_safe
        from saekit.evals.runner import evaluate_saes

        if not jobs:
            return {}
        saes = [snapshot(job) for job in jobs]
        sites = [self.sites[job.name] for job in jobs]
        with self.lock:
            results = evaluate_saes(
                self.backend, saes, self.token_batches, downstream=self.downstream,
                sites=sites, progress=False,
            )
        return {
            job.name: json_safe(result.to_dict())
            for job, result in zip(jobs, results, strict=True)
        }

    @staticmethod
    def postfix(evals: dict[str, dict[str, Any]]) -> dict[str, str]:
        """Progress-bar figures: with several SAEs, the worst one's explained variance and
        CE score (the SAE furthest behind)."""
        out: dict[str, str] = {}
        for key, label in (("explained_variance", "EV"), ("ce_loss_score", "CE")):
            values = [m[key] for m in evals.values() if isinstance(m.get(key), (int, float))]
            if values:
                out[label] = f"{min(values):.3f}"
        return out
