"""Checkpoints: exact resume after SIGINT or SIGKILL, atomic writes, divergence handling."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from training_helpers import make_sae, small_config

from saekit.training import SAEJob, Trainer, TrainingDiverged
from saekit.training import checkpoint as ckpt
from saekit.training.synthetic import SparseFeatureStream

STEPS = 40


def job() -> SAEJob:
    # A controller and a schedule, so their states must survive the resume too.
    cfg = small_config(STEPS, target_l0=6, lr_schedule="cosine", sparsity_coefficient=0.1)
    return SAEJob(make_sae("standard", seed=3), cfg)


def stream() -> SparseFeatureStream:
    return SparseFeatureStream(16, 32, 256, offset=1.0, seed=7)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name


class SignalAt(Iterator[torch.Tensor]):
    """Passes batches through and sends a signal to this process at batch `at`."""

    def __init__(self, inner: SparseFeatureStream, at: int, signum: int) -> None:
        self.inner, self.at, self.signum, self.count = inner, at, signum, 0

    def __next__(self) -> torch.Tensor:
        self.count += 1
        if self.count == self.at:
            os.kill(os.getpid(), self.signum)
        return next(self.inner)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_checkpoints_and_resume_is_bitwise_exact(tmp_path: Path, signum: int) -> None:
    # Whatever the handler was (a job started in the background ignores SIGINT), the
    # trainer must put it back.
    handler_before = signal.getsignal(signal.SIGINT)
    reference = Trainer(job(), stream()).fit().saes["sae"]
    run = tmp_path / "run"
    stopped = Trainer(job(), SignalAt(stream(), 9, signum), run, checkpoint_every=10**9).fit()
    assert stopped.interrupted == signum
    assert stopped.tokens == 9 * 256
    assert [p.name for p in ckpt.list_checkpoints(run)] == [f"tokens_{9 * 256:015d}"]
    resumed = Trainer(job(), stream(), run, checkpoint_every=10**9).fit(resume=True)
    assert resumed.tokens == STEPS * 256
    assert_same_weights(resumed.saes["sae"], reference)
    assert signal.getsignal(signal.SIGINT) is handler_before


SCRIPT = """
import sys, time, torch
torch.set_num_threads(1)
sys.path.insert(0, {helpers!r})
sys.path.insert(0, {tests!r})
from test_checkpoints import job, stream
from saekit.training import Trainer

class Slow:
    def __init__(self, inner):
        self.inner = inner
    def __iter__(self):
        return self
    def __next__(self):
        time.sleep(0.05)
        return next(self.inner)
    def state_dict(self):
        return self.inner.state_dict()
    def load_state_dict(self, state):
        self.inner.load_state_dict(state)

Trainer(job(), Slow(stream()), {run!r}, checkpoint_every=3 * 256).fit(resume={resume})
"""


def test_sigkill_mid_run_then_resume_gives_bitwise_equal_weights(tmp_path: Path) -> None:
    run = tmp_path / "run"
    here = str(Path(__file__).parent)
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT.format(helpers=here, tests=here, run=str(run),
                                                    resume=False)))
    proc = subprocess.Popen([sys.executable, str(script)])
    deadline = time.time() + 120
    while len(ckpt.list_checkpoints(run)) < 2 and time.time() < deadline:
        assert proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = int(ckpt.latest_checkpoint(run).name.split("_")[1])
    assert 0 < killed_at < STEPS * 256
    resumed = Trainer(job(), stream(), run, checkpoint_every=3 * 256).fit(resume=True)
    reference = Trainer(job(), stream()).fit().saes["sae"]
    assert_same_weights(resumed.saes["sae"], reference)


def test_resume_replays_a_stream_without_state(tmp_path: Path) -> None:
    reference = Trainer(job(), stream()).fit().saes["sae"]

    def plain(n_stop: int | None = None) -> Iterator[torch.Tensor]:
        source = stream()
        for i, batch in enumerate(source):
            if i == n_stop:
                os.kill(os.getpid(), signal.SIGINT)
            yield batch

    run = tmp_path / "run"
    Trainer(job(), plain(12), run).fit()
    resumed = Trainer(job(), plain(), run).fit(resume=True)
    assert_same_weights(resumed.saes["sae"], reference)


def test_non_finite_loss_stops_with_the_last_good_state(tmp_path: Path) -> None:
    def poisoned() -> Iterator[torch.Tensor]:
        for i, batch in enumerate(stream()):
            yield torch.full_like(batch, float("nan")) if i == 5 else batch

    run = tmp_path / "run"
    # NaN inputs are named as the cause (NonFiniteInput is a TrainingDiverged).
    with pytest.raises(
        TrainingDiverged,
        match=r"step 6 \(batch 6 of the activation stream, after 1280 tokens\): the batch's "
        r"input activations are not finite: nan at row 0",
    ):
        Trainer(job(), poisoned(), run).fit()
    state = ckpt.read_checkpoint(ckpt.latest_checkpoint(run))
    assert state["tokens"] == 5 * 256
    # The saved weights are those after the five good steps of an identical run.
    good = job()
    trainer = Trainer(good, stream())
    for _ in range(5):
        trainer._train_step(next(trainer.data))
        trainer.tokens_seen += 256
        trainer.step += 1
    for name, tensor in good.sae.state_dict().items():
        assert torch.equal(state["jobs"]["sae"]["sae"][name], tensor), name


def test_a_failed_checkpoint_write_leaves_the_previous_one(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = ckpt.write_checkpoint(run, 100, {"tokens": 100}, keep=2)
    # A tensor is written first, then the state fails to pickle: a half-written checkpoint.
    unpicklable = {"tokens": 200, "weights": torch.zeros(1000), "hook": lambda: None}
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        ckpt.write_checkpoint(run, 200, unpicklable, keep=2)
    assert ckpt.list_checkpoints(run) == [first]
    assert ckpt.read_checkpoint(first)["tokens"] == 100
    assert not list(ckpt.checkpoint_dir(run).glob(".tmp-*"))


def test_old_checkpoints_are_pruned(tmp_path: Path) -> None:
    for tokens in (1, 2, 3, 4):
        ckpt.write_checkpoint(tmp_path, tokens, {"tokens": tokens}, keep=2)
    assert [ckpt.read_checkpoint(p)["tokens"] for p in ckpt.list_checkpoints(tmp_path)] == [3, 4]


def test_resume_without_checkpoint_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="start it again without resume"):
        Trainer(job(), stream(), tmp_path).fit(resume=True)
