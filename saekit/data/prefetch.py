"""A background producer: the next activation batches are made while the SAE step runs.

The model forward (in the activation store) and the SAE step then overlap: PyTorch releases
the GIL inside its kernels, so one thread runs the model while the other trains. On an
accelerator the producer also issues its work on a stream of its own, so the device can run
both at once; the consumer waits on an event before it touches a batch.

Exact resume still works: with each batch the producer records the source's position right
after it, so `state_dict()` describes the batches the consumer has taken, not the ones the
producer has made ahead.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

_END = object()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetcher(Iterator[Any]):
    """Iterate `source` with up to `depth` batches made ahead in a background thread.

    Args:
        source: any iterator of batches (tensors, tuples or dicts of tensors). Its
            `state_dict` / `load_state_dict`, when it has them, pass through exactly.
        depth: batches made ahead (1 is enough to hide a forward shorter than the step).
        device: where the batches land; on an accelerator the producer uses its own stream.

    Call `close()` (or use it as a context manager) to stop the thread; it is a daemon
    thread, so an unclosed prefetcher does not keep the process alive.
    """

    def __init__(
        self, source: Iterator[Any], depth: int = 2, device: torch.device | str | None = None
    ) -> None:
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive integer, got {depth!r}")
        self.source = source
        self.depth = depth
        self.device = None if device is None else torch.device(device)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._finished = False
        self._state = self._source_state()

    def _source_state(self) -> Any:
        return self.source.state_dict() if hasattr(self.source, "state_dict") else None

    # the producer

    def _start(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._produce, name="saekit-prefetch", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        stream = None
        if self.device is not None and self.device.type != "cpu":
            stream = torch.Stream(device=self.device)
        try:
            with stream if stream is not None else contextlib.nullcontext():
                while not self._stop.is_set():
                    try:
                        batch = next(self.source)
                    except StopIteration:
                        self._put(_END)
                        return
                    event = None
                    if stream is not None:
                        event = torch.Event(device=self.device)
                        event.record(stream)
                    self._put((batch, self._source_state(), event))
        except BaseException as error:  # handed to the consumer, raised there
            self._put(_Failed(error))

    def _put(self, item: Any) -> None:
        # A bounded put that gives up when asked to stop, so close() never waits forever.
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    # the consumer

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if item is _END:
            self._finished = True
            self._join()
            raise StopIteration
        if isinstance(item, _Failed):
            self._finished = True
            self._join()
            raise item.error
        batch, state, event = item
        if event is not None:
            current = torch.accelerator.current_stream(self.device)
            current.wait_event(event)
            _record_stream(batch, current)
        self._state = state
        return batch

    # position

    def state_dict(self) -> Any:
        """The source's position after the last batch handed out (None if it has none)."""
        return self._state

    def load_state_dict(self, state: Any) -> None:
        """Drop the batches made ahead and continue the source from `state`."""
        self.close()
        self.source.load_state_dict(state)  # type: ignore[attr-defined]
        self._state = self._source_state()
        self._finished = False

    # shutdown

    def close(self) -> None:
        """Stop the producer thread and drop the batches it made ahead."""
        self._stop.set()
        self._join()

    def _join(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get_nowait()  # unblock a producer waiting to put
            self._thread.join(timeout=0.05)
        self._thread = None

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        # Sizes and settings of the source (d_in, batch_size, hooks, ...) read through.
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)


def _record_stream(batch: Any, stream: Any) -> None:
    """Tell the caching allocator that `batch`, made on the producer's stream, is used on
    `stream`, so its memory is not reused before that work is done."""
    if isinstance(batch, Tensor):
        batch.record_stream(stream)
    elif isinstance(batch, dict):
        for value in batch.values():
            _record_stream(value, stream)
    elif isinstance(batch, (tuple, list)):
        for value in batch:
            _record_stream(value, stream)
