"""The background producer: same batches, exact resume, errors, shutdown, real overlap."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from saekit.data.prefetch import Prefetcher
from saekit.data.store import ActivationStore
from saekit.models import load_model
from saekit.models.tiny import TINY_TEXTS, tiny_gpt2, tiny_tokenizer
from saekit.training import SAEJob, Trainer, TrainingSection
from saekit.training.synthetic import SparseFeatureStream

HOOK = "blocks.1.hook_resid_pre"
DOCS = TINY_TEXTS * 4


@pytest.fixture(scope="module")
def backend():
    return load_model(tiny_gpt2(300), tokenizer=tiny_tokenizer(300))


def store(backend) -> ActivationStore:
    return ActivationStore(
        backend, [HOOK, "blocks.0.hook_resid_pre"], DOCS, context_size=16, batch_size=8,
        buffer_size=32, model_batch_size=2, seed=3,
    )


def test_same_batches_in_the_same_order_as_the_source(backend) -> None:
    want = list(store(backend))
    with Prefetcher(store(backend), depth=3) as fetched:
        got = list(fetched)
    assert len(got) == len(want) > 10
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for hook in a:
            assert torch.equal(a[hook], b[hook])


def test_position_is_that_of_the_batches_taken_not_those_made_ahead(backend) -> None:
    want = list(store(backend))
    ahead = Prefetcher(store(backend), depth=4)
    for _ in range(5):
        next(ahead)
    time.sleep(0.2)  # let the producer run ahead as far as it can
    state = ahead.state_dict()
    ahead.close()
    resumed = Prefetcher(store(backend), depth=2)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(want) - 5
    for a, b in zip(rest, want[5:], strict=True):
        assert torch.equal(a[HOOK], b[HOOK])
    # The source's own attributes read through.
    assert resumed.batch_size == 8 and set(resumed.d_in) == {HOOK, "blocks.0.hook_resid_pre"}


class SignalAt(Iterator[torch.Tensor]):
    def __init__(self, inner: SparseFeatureStream, at: int) -> None:
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


def test_trainer_with_prefetch_resumes_exactly(tmp_path: Path) -> None:
    from saekit import SAE

    def job() -> SAEJob:
        torch.manual_seed(0)
        cfg = TrainingSection(tokens=30 * 64, batch_size=64, lr=3e-3)
        return SAEJob(SAE.create("topk", 16, 64, k=4), cfg)

    def stream() -> SparseFeatureStream:
        return SparseFeatureStream(16, 32, 64, seed=5)

    reference = Trainer(job(), stream()).fit().saes["sae"]
    run = tmp_path / "run"
    # The signal arrives while the producer, not the trainer, reads batch 12: the trainer
    # has taken fewer batches, and the checkpoint must hold the position of those.
    with Prefetcher(SignalAt(stream(), 12), depth=3) as data:
        stopped = Trainer(job(), data, run, checkpoint_every=10**9).fit()
    assert stopped.interrupted == signal.SIGINT
    with Prefetcher(stream(), depth=3) as data:
        resumed = Trainer(job(), data, run).fit(resume=True).saes["sae"]
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


class Broken(Iterator[int]):
    def __init__(self) -> None:
        self.n = 0

    def __next__(self) -> int:
        self.n += 1
        if self.n == 3:
            raise RuntimeError("the model ran out of memory")
        return self.n


def test_producer_errors_reach_the_consumer_and_the_end_is_the_end() -> None:
    fetched = Prefetcher(Broken())
    assert [next(fetched), next(fetched)] == [1, 2]
    with pytest.raises(RuntimeError, match="ran out of memory"):
        next(fetched)
    with pytest.raises(StopIteration):
        next(fetched)
    assert list(Prefetcher(iter(range(4)))) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="depth must be a positive integer"):
        Prefetcher(iter([]), depth=0)


def test_close_stops_a_producer_blocked_on_a_full_queue() -> None:
    endless = Prefetcher(iter(range(10**9)), depth=1)
    assert next(endless) == 0
    thread = endless._thread
    assert thread is not None and thread.is_alive()
    endless.close()
    assert not thread.is_alive()
    assert not any(t.name == "saekit-prefetch" and t is thread for t in threading.enumerate())


class Slow(Iterator[int]):
    """A producer that waits (as a model forward does, with the GIL released)."""

    def __init__(self, n: int, seconds: float) -> None:
        self.n, self.seconds, self.i = n, seconds, 0

    def __next__(self) -> int:
        if self.i == self.n:
            raise StopIteration
        time.sleep(self.seconds)
        self.i += 1
        return self.i


def test_production_overlaps_consumption() -> None:
    def run(source: Iterator[int]) -> float:
        start = time.perf_counter()
        for _ in source:
            time.sleep(0.05)  # the SAE step
        return time.perf_counter() - start

    serial = run(Slow(10, 0.05))
    overlapped = run(Prefetcher(Slow(10, 0.05)))
    assert serial >= 1.0
    assert overlapped < 0.8 * serial  # ideal: 0.55 s of 1.0 s
