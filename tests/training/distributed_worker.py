"""One rank of a distributed training test, launched torchrun-style by test_distributed.py.

    RANK=r WORLD_SIZE=w LOCAL_RANK=r MASTER_ADDR=127.0.0.1 MASTER_PORT=p \\
        python distributed_worker.py {data|sae} RUN_DIR OUT [--kill-at N] [--resume]

Every rank builds the same SAEs and the same global stream of synthetic activations; the
`data` scenario trains on this rank's slice of every batch (data parallel), the `sae`
scenario deals the SAEs out across ranks. Rank 0 saves the trained SAEs' weights and
sparsity to OUT. The same builders serve the one-process reference in the tests.
"""

from __future__ import annotations

import argparse
import os
import signal
from collections.abc import Iterator
from typing import Any

import torch
from training_helpers import make_sae, small_config

from saekit.training import SAEJob, Trainer
from saekit.training.distributed import (
    DistEnv,
    RankSlice,
    destroy_process_group,
    init_process_group,
    make_parallelism,
)
from saekit.training.synthetic import SparseFeatureStream

STEPS = 40
BATCH = 256  # the global batch
D_IN, D_OUT = 16, 12


def data_jobs() -> list[SAEJob]:
    """Two SAEs side by side; topk with a short dead window exercises the AuxK dead mask."""
    return [
        SAEJob(make_sae("standard", seed=3, dtype="float64"), small_config(
            STEPS, BATCH, sparsity_coefficient=0.1, lr_schedule="cosine"), name="standard"),
        SAEJob(make_sae("topk", seed=4, dtype="float64"), small_config(
            STEPS, BATCH, dead_after_tokens=BATCH * 3), name="topk"),
    ]


def data_stream() -> Iterator[Any]:
    return SparseFeatureStream(D_IN, 32, BATCH, offset=1.0, seed=7)


def sae_jobs() -> list[SAEJob]:
    """Three SAEs on two hooks: an SAE on "a", one on "b" and a transcoder a -> b."""
    return [
        SAEJob(make_sae("standard", seed=5, dtype="float64"), small_config(
            STEPS, BATCH, sparsity_coefficient=0.1), name="on_a", hook="a"),
        SAEJob(make_sae("topk", d_in=D_OUT, seed=6, dtype="float64"), small_config(
            STEPS, BATCH), name="on_b", hook="b"),
        SAEJob(make_sae("transcoder", d_out=D_OUT, seed=7, dtype="float64"), small_config(
            STEPS, BATCH, sparsity_coefficient=0.1), name="a_to_b", hook="a", hook_out="b"),
    ]


class HookPairs(Iterator[dict[str, torch.Tensor]]):
    """A two-hook stream {a: x, b: y}, as one model pass yields for two hooks."""

    def __init__(self) -> None:
        self.inner = SparseFeatureStream(D_IN, 32, BATCH, offset=1.0, d_out=D_OUT, seed=9)

    def __next__(self) -> dict[str, torch.Tensor]:
        x, y = next(self.inner)
        return {"a": x, "b": y}

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


class KillAt(Iterator[Any]):
    """Passes batches through and SIGKILLs this process when batch `at` is asked for."""

    def __init__(self, inner: Iterator[Any], at: int) -> None:
        self.inner, self.at, self.count = inner, at, 0

    def __next__(self) -> Any:
        self.count += 1
        if self.count == self.at:
            os.kill(os.getpid(), signal.SIGKILL)
        return next(self.inner)

    def state_dict(self) -> Any:
        return self.inner.state_dict()  # type: ignore[attr-defined]

    def load_state_dict(self, state: Any) -> None:
        self.inner.load_state_dict(state)  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["data", "sae"])
    parser.add_argument("run_dir")
    parser.add_argument("out")
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    env = init_process_group("cpu")
    try:
        parallel = make_parallelism(args.scenario)
        if args.scenario == "data":
            jobs, stream = data_jobs(), RankSlice(data_stream(), env.rank, env.world_size)
        else:
            jobs, stream = sae_jobs(), RankSlice(HookPairs(), env.rank, env.world_size)
        if args.kill_at is not None:
            stream = KillAt(stream, args.kill_at)
        trainer = Trainer(
            jobs, stream, args.run_dir, checkpoint_every=10 * BATCH, log_every=5,
            parallel=parallel,
        )
        result = trainer.fit(resume=args.resume)
        if env.is_main:
            torch.save(
                {
                    "weights": {n: s.state_dict() for n, s in result.saes.items()},
                    "sparsity": result.sparsity,
                    "tokens": result.tokens,
                    "local_jobs": [j.name for j in trainer.jobs],
                },
                args.out,
            )
    finally:
        destroy_process_group()


if __name__ == "__main__":
    assert DistEnv.from_env().distributed, "launch with RANK / WORLD_SIZE set"
    main()
