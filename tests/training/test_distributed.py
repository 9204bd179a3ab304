"""Distributed training on two gloo ranks (CPU processes launched as torchrun would).

The expectations come from one process training the same SAEs on the same global batches.
Each launch costs two Python processes importing torch (about 25 s on a busy 2-core machine),
so the default suite launches once; the resume and SAE-split launches are marked slow.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import distributed_worker as worker
import pytest
import torch

from saekit.training import Trainer
from saekit.training import checkpoint as ckpt
from saekit.training.distributed import DistEnv, Parallelism, RankSlice, make_parallelism
from saekit.training.runlog import read_log

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
WORLD = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(scenario: str, run_dir: Path, out: Path, *extra: str) -> list[int]:
    """Run the two ranks to the end; their exit codes."""
    port = str(free_port())
    procs = []
    for rank in range(WORLD):
        env = {
            **os.environ,
            "RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)]),
        }
        cmd = [sys.executable, str(HERE / "distributed_worker.py"), scenario, str(run_dir),
               str(out), *extra]
        procs.append(subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True))
    codes = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        if proc.returncode not in (0, -9):
            print(err, file=sys.stderr)
        codes.append(proc.returncode)
    return codes


def single_process(jobs: list[Any], stream: Any) -> dict[str, Any]:
    result = Trainer(jobs, stream).fit()
    return {
        "weights": {n: s.state_dict() for n, s in result.saes.items()},
        "sparsity": result.sparsity,
    }


def assert_close(got: dict[str, Any], want: dict[str, Any], exact: bool = False) -> None:
    assert got["weights"].keys() == want["weights"].keys()
    for name, tensors in want["weights"].items():
        for key, value in tensors.items():
            other = got["weights"][name][key]
            if exact:
                assert torch.equal(other, value), f"{name}.{key}"
            else:
                torch.testing.assert_close(other, value, rtol=1e-6, atol=1e-8,
                                           msg=f"{name}.{key}")
        assert torch.equal(got["sparsity"][name], want["sparsity"][name]), name


@pytest.fixture(scope="module")
def data_parallel_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("dp")
    out = folder / "out.pt"
    assert launch("data", folder / "run", out) == [0, 0]
    return folder / "run", torch.load(out, weights_only=True)


def test_two_ranks_on_a_global_batch_equal_one_process(data_parallel_run) -> None:
    run_dir, got = data_parallel_run
    torch.set_num_threads(1)
    want = single_process(worker.data_jobs(), worker.data_stream())
    assert got["tokens"] == worker.STEPS * worker.BATCH
    # Each rank trained on half of every batch, yet weights, firing frequencies (the
    # dead-latent statistics) and the topk AuxK dead mask match the global-batch run.
    assert_close(got, want)
    # One writer: one log line per logging step, counting global tokens.
    records = read_log(run_dir)
    assert [r["step"] for r in records] == list(range(5, worker.STEPS + 1, 5))
    assert records[-1]["tokens"] == worker.STEPS * worker.BATCH
    saved = ckpt.read_checkpoint(ckpt.latest_checkpoint(run_dir))
    assert saved["world_size"] == WORLD and len(saved["ranks"]) == WORLD


@pytest.mark.slow
def test_two_rank_run_killed_and_resumed_equals_uninterrupted(
    data_parallel_run, tmp_path: Path
) -> None:
    _, uninterrupted = data_parallel_run
    run_dir, out = tmp_path / "run", tmp_path / "out.pt"
    # Both ranks die by SIGKILL when reading batch 25, after the checkpoint at step 20.
    codes = launch("data", run_dir, out, "--kill-at", "25")
    assert codes != [0, 0] and not out.exists()
    assert ckpt.latest_checkpoint(run_dir).name == f"tokens_{20 * worker.BATCH:015d}"
    assert launch("data", run_dir, out, "--resume") == [0, 0]
    resumed = torch.load(out, weights_only=True)
    assert_close(resumed, uninterrupted, exact=True)
    steps = [r["step"] for r in read_log(run_dir)]
    assert steps == list(range(5, worker.STEPS + 1, 5))  # no step logged twice


@pytest.mark.slow
def test_saes_split_over_two_ranks_equal_one_process(tmp_path: Path) -> None:
    out = tmp_path / "out.pt"
    assert launch("sae", tmp_path / "run", out) == [0, 0]
    got = torch.load(out, weights_only=True)
    assert got["local_jobs"] == ["on_a", "a_to_b"]  # job i trains on rank i % 2
    torch.set_num_threads(1)
    want = single_process(worker.sae_jobs(), worker.HookPairs())
    assert_close(got, want)
    records = read_log(tmp_path / "run")
    assert {"on_a/loss", "on_b/loss", "a_to_b/loss"} <= set(records[-1])


def test_launch_environment_is_read_and_checked() -> None:
    assert DistEnv.from_env({}) == DistEnv(0, 1, 0)
    env = DistEnv.from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.is_main) == (3, 8, 1, False)
    with pytest.raises(ValueError, match="RANK=8, WORLD_SIZE=8"):
        DistEnv.from_env({"RANK": "8", "WORLD_SIZE": "8", "LOCAL_RANK": "0"})
    with pytest.raises(ValueError, match="not an integer"):
        DistEnv.from_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="'data' or 'sae'"):
        make_parallelism("model")
    assert type(make_parallelism("data")) is Parallelism  # no process group: one process


def test_rank_slice_splits_batches_evenly_and_refuses_uneven_ones() -> None:
    rows = torch.arange(8.0)[:, None]
    parts = [next(RankSlice(iter([rows]), r, 2)) for r in range(2)]
    assert torch.equal(torch.cat(parts), rows)
    pair = next(RankSlice(iter([{"a": rows, "b": rows * 2}]), 1, 2))
    assert torch.equal(pair["b"], rows[4:] * 2)
    with pytest.raises(ValueError, match="does not split evenly over 3 ranks"):
        next(RankSlice(iter([rows]), 0, 3))
