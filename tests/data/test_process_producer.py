"""The producer process: the same batches as the source, exact positions, failures raised."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from saekit.data.process_producer import ProcessProducer, fork_available
from saekit.data.store import ActivationStore
from saekit.models import load_model
from saekit.models.tiny import TINY_TEXTS, tiny_gpt2, tiny_tokenizer
from saekit.training import SAEJob, Trainer, TrainingConfig
from saekit.training.synthetic import SparseFeatureStream

pytestmark = pytest.mark.skipif(not fork_available(), reason="needs fork (Linux)")

HOOK = "blocks.1.hook_resid_pre"
DOCS = TINY_TEXTS * 4


@pytest.fixture(scope="module")
def backend():
    return load_model(tiny_gpt2(300), tokenizer=tiny_tokenizer(300))


def store(backend, hooks=(HOOK, "blocks.0.hook_resid_pre")) -> ActivationStore:
    return ActivationStore(backend, list(hooks), DOCS, context_size=16, batch_size=8,
                           buffer_size=32, model_batch_size=2, seed=3)


def test_same_batches_as_the_source_and_exact_positions(backend) -> None:
    want = list(store(backend))
    with ProcessProducer(store(backend), depth=3) as produced:
        head = [next(produced) for _ in range(5)]
        time.sleep(0.2)  # the child runs ahead; the position must still be after batch 5
        state = produced.state_dict()
        rest = list(produced)
    assert len(head) + len(rest) == len(want) > 10
    for a, b in zip(head + rest, want, strict=True):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[h], b[h]) for h in a)
    resumed = ProcessProducer(store(backend), depth=2)
    resumed.load_state_dict(state)
    again = list(resumed)
    assert len(again) == len(want) - 5
    assert all(torch.equal(a[HOOK], b[HOOK]) for a, b in zip(again, want[5:], strict=True))
    # One hook named alone gives tensors; the source's attributes read through.
    single = ActivationStore(backend, HOOK, DOCS, context_size=16, batch_size=8,
                             buffer_size=32, model_batch_size=2, seed=3)
    with ProcessProducer(single, depth=2) as one:
        assert one.batch_size == 8 and one.d_in == 32
        batches = [next(one) for _ in range(3)]
    assert all(torch.equal(b, w[HOOK]) for b, w in zip(batches, want, strict=False))


class Broken(Iterator[torch.Tensor]):
    def __init__(self, fail_at: int, how: str = "raise") -> None:
        self.n, self.fail_at, self.how = 0, fail_at, how

    def __next__(self) -> torch.Tensor:
        self.n += 1
        if self.n == self.fail_at:
            if self.how == "raise":
                raise RuntimeError("the model ran out of memory")
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.full((2, 3), float(self.n))


def test_child_failures_reach_the_parent() -> None:
    produced = ProcessProducer(Broken(3))
    assert [next(produced)[0, 0].item() for _ in range(2)] == [1.0, 2.0]
    with pytest.raises(RuntimeError, match="ran out of memory"):
        next(produced)
    with pytest.raises(StopIteration):
        next(produced)
    killed = ProcessProducer(Broken(3, how="kill"))
    next(killed)
    next(killed)
    with pytest.raises(RuntimeError, match="producer process stopped unexpectedly"):
        next(killed)
    with pytest.raises(ValueError, match="depth must be a positive integer"):
        ProcessProducer(Broken(9), depth=0)


def test_start_close_and_an_empty_source() -> None:
    produced = ProcessProducer(Broken(10**9), depth=2)
    produced.start()  # the first batch is made here, then the child is forked
    child = produced._child
    assert child.is_alive()
    assert next(produced)[0, 0].item() == 1.0 and next(produced)[0, 0].item() == 2.0
    produced.close()
    assert not child.is_alive()
    # The source here is behind the child's: iteration ends rather than repeating batches.
    with pytest.raises(StopIteration):
        next(produced)
    assert list(ProcessProducer(iter([]))) == []


class SignalAt(Iterator[torch.Tensor]):
    """Raises SIGINT in the parent when the parent takes batch `at`."""

    def __init__(self, inner: ProcessProducer, at: int) -> None:
        self.inner, self.at, self.count = inner, at, 0

    def __next__(self) -> torch.Tensor:
        self.count += 1
        if self.count == self.at:
            signal.raise_signal(signal.SIGINT)
        return next(self.inner)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state) -> None:
        self.inner.load_state_dict(state)


def test_trainer_with_a_producer_process_resumes_exactly(tmp_path: Path) -> None:
    from saekit import SAE

    def job() -> SAEJob:
        torch.manual_seed(0)
        cfg = TrainingConfig(tokens=30 * 64, batch_size=64, lr=3e-3)
        return SAEJob(SAE.create("topk", 16, 64, k=4), cfg)

    def stream() -> SparseFeatureStream:
        return SparseFeatureStream(16, 32, 64, seed=5)

    reference = Trainer(job(), stream()).fit().saes["sae"]
    run = tmp_path / "run"
    with ProcessProducer(stream(), depth=3) as produced:
        stopped = Trainer(job(), SignalAt(produced, 12), run, checkpoint_every=10**9).fit()
    assert stopped.interrupted == signal.SIGINT
    with ProcessProducer(stream(), depth=3) as produced:
        resumed = Trainer(job(), produced, run).fit(resume=True).saes["sae"]
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
