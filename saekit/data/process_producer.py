"""A producer process: activation batches are made in a forked child while the SAE trains.

The background thread of `saekit.data.prefetch` overlaps device work; on a CPU the model
forward and the SAE step are both Python-heavy and hold the GIL for much of their time, so
two threads mostly take turns. A child process has its own interpreter: it runs the
activation store (model forward, buffer, shuffling) on its share of the cores while the
parent trains on the rest.

The child is forked, so it starts from the parent's source as it is (model, data position,
shuffling state) without pickling any of it, and works from then on on its own copy.
Batches come back through shared-memory slots, each with the source's position right after
it, so `state_dict()` describes the batches the parent has taken: a checkpoint resumes
exactly. Forking needs Linux (`fork_available()`).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import pickle
import queue
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import torch
from torch import Tensor

_END = "end"
_NOTHING = object()  # the source was empty from the start
_BATCH = "batch"
_FAILED = "failed"


def fork_available() -> bool:
    """Whether a producer process can be forked here (Linux, and not inside a daemon
    process, which may not have children)."""
    return (
        sys.platform.startswith("linux")
        and "fork" in mp.get_all_start_methods()
        and not mp.current_process().daemon
    )


def _structure(batch: Any) -> dict[str, Tensor]:
    """A batch as {key: tensor}: a tensor is {"": t}, a dict stays as it is."""
    if isinstance(batch, Tensor):
        return {"": batch}
    if isinstance(batch, dict) and all(isinstance(v, Tensor) for v in batch.values()):
        return dict(batch)
    raise TypeError(
        f"a producer process serves tensors or dicts of tensors, got {type(batch).__name__}"
    )


def _rebuild(parts: dict[str, Tensor]) -> Tensor | dict[str, Tensor]:
    return parts[""] if set(parts) == {""} else parts


def _produce(
    source: Iterator[Any],
    slots: list[dict[str, Tensor]],
    free: Connection,
    ready: Connection,
    threads: int,
    parent_ends: tuple[Connection, ...],
) -> None:
    """The child: fill free slots with batches, announce each with the position after it."""
    for end in parent_ends:  # so each side sees the other's death as end-of-file
        end.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    torch.set_num_threads(threads)
    try:
        while True:
            slot = free.recv()
            if slot is None:
                return
            try:
                batch = next(source)
            except StopIteration:
                ready.send_bytes(pickle.dumps((_END, None, None)))
                return
            parts = _structure(batch)
            if set(parts) != set(slots[slot]) or any(
                parts[k].shape != slots[slot][k].shape for k in parts
            ):
                raise ValueError(
                    "the source's batches changed shape or keys; a producer process needs "
                    "batches of one shape"
                )
            for key, tensor in parts.items():
                slots[slot][key].copy_(tensor)
            state = source.state_dict() if hasattr(source, "state_dict") else None
            # Plain pickle: tensors in the state travel as data, not as shared-memory
            # handles that would die with the child (torch's reducers pass descriptors).
            ready.send_bytes(pickle.dumps((_BATCH, slot, state)))
    except EOFError:
        return  # the parent is gone
    except BaseException as error:  # handed to the parent, raised there
        try:
            message = pickle.dumps((_FAILED, None, error))
        except Exception:
            text = "".join(traceback.format_exception(error))
            failure = RuntimeError(f"the producer process failed:\n{text}")
            message = pickle.dumps((_FAILED, None, failure))
        with contextlib.suppress(OSError):
            ready.send_bytes(message)


def _receive(ready: Connection, inbox: queue.Queue[Any]) -> None:
    """The parent's receiving thread: drains the child's messages as they come, so the
    child never waits on a full pipe while the parent trains; None when the child is gone."""
    while True:
        try:
            data = ready.recv_bytes()
        except (EOFError, OSError):
            inbox.put(None)
            return
        message = pickle.loads(data)  # noqa: S301 - written by our own child process
        inbox.put(message)
        if message[0] != _BATCH:
            return


class ProcessProducer(Iterator[Any]):
    """Iterate `source` with up to `depth` batches made ahead in a forked child process.

    Args:
        source: an iterator of equally shaped CPU batches (tensors or dicts of tensors), such
            as `ActivationStore`. Its `state_dict` / `load_state_dict`, when it has them,
            pass through exactly.
        depth: batches made ahead.
        threads: torch threads in the child (default: half the parent's, at least one).

    The first batch is made here, before the child starts (it gives the batches' shape;
    see `start()`).
    Each batch handed out is a copy the caller owns. Call `close()` (or use it as a
    context manager) to stop the child; it is stopped when this object is collected too.
    """

    def __init__(self, source: Iterator[Any], depth: int = 2, threads: int | None = None) -> None:
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise ValueError(f"depth must be a positive integer, got {depth!r}")
        if not fork_available():
            raise RuntimeError(
                "a producer process needs fork (Linux, not inside a daemon process); "
                "iterate the source directly instead"
            )
        self.source = source
        self.depth = depth
        self.threads = threads or max(1, torch.get_num_threads() // 2)
        self._ctx = mp.get_context("fork")
        self._child: Any = None
        self._receiver: threading.Thread | None = None
        self._slots: list[dict[str, Tensor]] = []
        self._free: Connection | None = None
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._finished = False
        self._first: Any = None
        self._state = self._source_state()

    def _source_state(self) -> Any:
        return self.source.state_dict() if hasattr(self.source, "state_dict") else None

    def start(self) -> None:
        """Make the first batch here (with this process's threads), then fork the child for
        the rest. Called by the first `next()` when not called before; call it yourself to
        choose when that first, unoverlapped batch is made (e.g. before lowering the
        threads of this process for training)."""
        if self._child is not None or self._finished:
            return
        try:
            batch = next(self.source)
        except StopIteration:
            self._finished = True
            self._first = _NOTHING
            return
        self._first = batch
        self._state = self._source_state()
        parts = _structure(batch)
        self._slots = [
            {k: torch.empty_like(t, device="cpu").share_memory_() for k, t in parts.items()}
            for _ in range(self.depth)
        ]
        free_out, free_in = self._ctx.Pipe(duplex=False)
        ready_out, ready_in = self._ctx.Pipe(duplex=False)
        self._child = self._ctx.Process(
            target=_produce,
            args=(self.source, self._slots, free_out, ready_in, self.threads,
                  (free_in, ready_out)),
            name="saekit-producer", daemon=True,
        )
        self._child.start()
        free_out.close()
        ready_in.close()
        self._free = free_in
        for slot in range(self.depth):
            self._free.send(slot)
        self._inbox = queue.Queue()
        self._receiver = threading.Thread(
            target=_receive, args=(ready_out, self._inbox), name="saekit-producer-inbox",
            daemon=True,
        )
        self._receiver.start()

    def __iter__(self) -> ProcessProducer:
        return self

    def __next__(self) -> Any:
        if self._child is None and not self._finished:
            self.start()
        if self._first is not None:
            first, self._first = self._first, None
            if first is not _NOTHING:
                return first
        if self._finished:
            raise StopIteration
        message = self._inbox.get()
        if message is None:
            self._child.join(timeout=5)
            code = self._child.exitcode
            self.close()
            raise RuntimeError(
                f"the producer process stopped unexpectedly (exit code {code}); out of "
                "memory? Train without it (--no-prefetch) to see the error here"
            )
        kind, slot, payload = message
        if kind == _END:
            self.close()
            raise StopIteration
        if kind == _FAILED:
            self.close()
            raise payload
        batch = {k: t.clone() for k, t in self._slots[slot].items()}
        assert self._free is not None
        self._free.send(slot)
        self._state = payload
        return _rebuild(batch)

    # position

    def state_dict(self) -> Any:
        """The source's position after the last batch handed out (None if it has none)."""
        return self._state

    def load_state_dict(self, state: Any) -> None:
        """Stop the child, drop what it made ahead, and continue the source from `state`."""
        self.close()
        self.source.load_state_dict(state)  # type: ignore[attr-defined]
        self._state = self._source_state()
        self._finished = False
        self._first = None

    # shutdown

    def close(self) -> None:
        """Stop the child process and drop the batches it made ahead. Iteration then ends
        (the source here is behind the child's); `load_state_dict` continues it."""
        child, self._child = self._child, None
        self._finished = True
        if child is None:
            return
        assert self._free is not None
        with contextlib.suppress(OSError):
            self._free.send(None)
        child.join(timeout=2)
        if child.is_alive():
            child.terminate()
            child.join(timeout=2)
        self._free.close()
        self._free = None
        if self._receiver is not None:
            self._receiver.join(timeout=2)  # ends at the child's end-of-file
            self._receiver = None
        self._slots = []

    def __enter__(self) -> ProcessProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # The child leaves through os._exit, so this runs in the parent only.
        if getattr(self, "_child", None) is not None:
            self.close()

    def __getattr__(self, name: str) -> Any:
        # Sizes and settings of the source (d_in, batch_size, hooks, ...) read through.
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

