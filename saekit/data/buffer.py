"""The shuffle buffer shared by the activation store and the activation-cache reader."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor

from saekit.finite import NonFiniteActivations
from saekit.progress import bar

logger = logging.getLogger(__name__)

STATE_VERSION = 1
#: Rows whose norm exceeds this many times the median are left out of the norm estimate.
OUTLIER_NORM_RATIO = 100.0


def check_buffer_sizes(batch_size: int, buffer_size: int) -> None:
    """Refuse sizes that cannot work, before any model or file is touched."""
    for name, value in (("batch_size", batch_size), ("buffer_size", buffer_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if buffer_size < batch_size:
        raise ValueError(
            f"buffer_size={buffer_size} cannot hold one batch of batch_size={batch_size}; "
            f"make buffer_size at least {batch_size} (several times larger mixes better)"
        )


def robust_mean_norm(norms: Tensor, hook: str = "the hook") -> float:
    """The mean of row norms `norms` [rows], leaving out rows whose norm is more than
    OUTLIER_NORM_RATIO times the median norm of the nonzero rows.

    A plain mean is at the mercy of one row: a single row of norm 1e30 among 4,096 made the
    norm scaling factor 2.5e-27 and every folded weight infinite. Rows that large are
    corrupt data, not activations; genuinely large rows (the first positions of many
    models, tens of times the median) stay within the ratio and count as the definition
    sqrt(d_in) / E||x|| wants. Left-out rows are reported in a warning."""
    bad = ~torch.isfinite(norms)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise NonFiniteActivations(
            f"activation row {row} of the norm estimate at {hook} is not finite "
            f"({int(bad.sum())} such rows); the data holds NaN or infinity"
        )
    nonzero = norms[norms > 0]
    if nonzero.numel() == 0:
        raise ValueError(
            f"every activation row read at {hook} is zero, so there is no norm to scale by; "
            "check the hook, or turn norm_scaling off (--no-norm-scaling)"
        )
    limit = OUTLIER_NORM_RATIO * float(nonzero.median())
    kept = norms <= limit
    left_out = norms.numel() - int(kept.sum())
    if left_out:
        logger.warning(
            "the norm scaling factor at %s leaves out %d of %d activation rows whose norm is "
            "over %g times the median (the largest: %.3g, median %.3g); rows that large are "
            "likely corrupt data", hook, left_out, norms.numel(), OUTLIER_NORM_RATIO,
            float(norms.max()), limit / OUTLIER_NORM_RATIO,
        )
    return float(norms[kept].mean())


class ShuffledRows:
    """Serves `[batch_size, d]` batches (or `{hook: ...}` dicts) from a shuffle buffer.

    Subclasses provide chunks of rows (`_next_chunk`), a small description of their position
    (`_source_state` / `_load_source_state`) and their settings (`_config`). A buffer is
    filled with at least `buffer_size` rows (the rows left over from the last buffer
    included), shuffled, and served; so memory holds at most `buffer_size` rows plus one
    chunk. Chunks are copied into memory the buffer owns, unless the subclass sets
    `_serves_in_place` (its chunks stay valid while the buffer is served, as the cache's
    mapped shards do): then batches are gathered from the chunks where they lie.
    The position is saved as (source position when the buffer began, RNG state then, rows
    carried in, rows served from it), so restoring re-reads one buffer only.
    """

    hooks: list[str]
    single: bool
    batch_size: int
    buffer_size: int
    shuffle: bool
    device: torch.device
    dtype: torch.dtype

    def _init_buffer(self, seed: int, reuse_batches: int = 0) -> None:
        if not isinstance(reuse_batches, int) or isinstance(reuse_batches, bool) or (
            reuse_batches < 0
        ):
            raise ValueError(
                f"reuse_batches must be 0 (every batch in new memory) or a positive number of "
                f"batches, got {reuse_batches!r}"
            )
        self.seed = seed
        #: Batches are gathered into a ring of this many reused tensors (0: new ones).
        self.reuse_batches = reuse_batches
        self._ring: list[dict[str, Tensor]] = []
        self._ring_next = 0
        self._rng = torch.Generator().manual_seed(seed)
        #: The buffer's rows, as consecutive segments ({hook: [rows, d]} each): one in the
        #: buffer's own memory, or, serving in place, the carried rows and then each chunk.
        self._segments: list[dict[str, Tensor]] | None = None
        #: Buffer row at which each segment after the first begins.
        self._segment_starts: Tensor | None = None
        self._buffered = 0
        #: Memory the buffer owns, by hook, reused from fill to fill.
        self._storage: dict[str, Tensor] = {}
        self._serves_in_place = False
        self._order: Tensor | None = None
        self._cursor = 0
        self._cycle: dict[str, Any] | None = None
        self._batches = 0

    # what subclasses provide

    def _next_chunk(self) -> dict[str, Tensor] | None:
        raise NotImplementedError

    def _source_state(self) -> Any:
        raise NotImplementedError

    def _load_source_state(self, state: Any) -> None:
        raise NotImplementedError

    def _config(self) -> dict[str, Any]:
        raise NotImplementedError

    # serving

    @property
    def batches_served(self) -> int:
        """Batches served since the start (kept across `state_dict` / `load_state_dict`)."""
        return self._batches

    def _fill(self, carry: dict[str, Tensor] | None) -> None:
        self._cycle = {
            "source": self._source_state(),
            "rng": self._rng.get_state(),
            "carry": None if carry is None else {h: t.cpu() for h, t in carry.items()},
        }
        rows = 0
        segments = []
        if carry is not None:
            rows = carry[self.hooks[0]].shape[0]
            widths = {h: carry[h].shape[-1] for h in self.hooks}
            held = self._reserve(0, rows, widths)
            for hook, dest in held.items():
                dest.copy_(carry[hook])
            segments.append(held)
        if self._serves_in_place:
            while rows < self.buffer_size:
                chunk = self._next_chunk()
                if chunk is None:
                    break
                segments.append({h: chunk[h] for h in self.hooks})
                rows += chunk[self.hooks[0]].shape[0]
        else:
            while rows < self.buffer_size:
                added = self._read_chunk_into(rows)
                if added is None:
                    break
                rows += added
            segments = [{h: t[:rows] for h, t in self._storage.items()}]
        self._cursor = 0
        if rows == 0:
            self._segments = None
            return
        self._segments = segments
        self._buffered = rows
        sizes = torch.tensor([s[self.hooks[0]].shape[0] for s in segments])
        self._segment_starts = sizes.cumsum(0)[:-1].to(self.device)
        # Batches gather their rows through this permutation, which copies each row once
        # instead of permuting the whole buffer first.
        self._order = (
            torch.randperm(rows, generator=self._rng).to(self.device) if self.shuffle else None
        )

    def _reserve(self, start: int, rows: int, widths: dict[str, int]) -> dict[str, Tensor]:
        """Writable rows start:start+rows of the buffer, one tensor per hook.

        The buffer's memory is allocated once and reused by every fill: writing into pages
        the process already holds runs several times faster here than into fresh ones.
        Serving in place, it only ever holds the rows carried over (fewer than a batch)."""
        end = start + rows
        usual = self.batch_size if self._serves_in_place else self.buffer_size + self.batch_size
        for hook in self.hooks:
            held = self._storage.get(hook)
            if held is not None and held.shape[0] >= end:
                continue
            width = widths[hook]
            grown = torch.empty(max(end, usual), width, dtype=self.dtype, device=self.device)
            if held is not None and start:
                grown[:start].copy_(held[:start])
            self._storage[hook] = grown
        return {h: t[start:end] for h, t in self._storage.items()}

    def _read_chunk_into(self, start: int) -> int | None:
        """Append the next chunk at buffer row `start`; returns its rows (None at the end).

        This copies a `_next_chunk()`; a source that can write straight into the buffer
        (the cache reader) overrides it."""
        chunk = self._next_chunk()
        if chunk is None:
            return None
        rows = chunk[self.hooks[0]].shape[0]
        widths = {h: chunk[h].shape[-1] for h in self.hooks}
        for hook, dest in self._reserve(start, rows, widths).items():
            dest.copy_(chunk[hook])
        return rows

    def _rows_left(self) -> int:
        return 0 if self._segments is None else self._buffered - self._cursor

    def __iter__(self) -> ShuffledRows:
        return self

    def __next__(self) -> Tensor | dict[str, Tensor]:
        if self._rows_left() < self.batch_size:
            carry = None
            if self._segments is not None:
                carry = self._rows(self._cursor, None)
            # Let go of the old segments first: mapped chunks are released with them.
            self._segments = None
            self._fill(carry)
            if self._rows_left() < self.batch_size:
                self._segments = None
                raise StopIteration
        start, self._cursor = self._cursor, self._cursor + self.batch_size
        self._batches += 1
        batch = self._rows(start, self._cursor, self._ring_slot())
        return batch[self.hooks[0]] if self.single else batch

    def _ring_slot(self) -> dict[str, Tensor] | None:
        """The reused tensors the next batch goes into, or None for new ones.

        A new [batch, d] tensor is fresh memory, and filling fresh pages (a page fault
        each) costs more than the gather itself: here 1.3 GB/s against 4.4 GB/s into pages
        already held. A consumer that is done with each batch a few batches later (the
        trainer) asks for a ring instead."""
        if not self.reuse_batches:
            return None
        if len(self._ring) < self.reuse_batches:
            self._ring.append({})
        slot = self._ring[self._ring_next]
        self._ring_next = (self._ring_next + 1) % self.reuse_batches
        for hook, width in self._widths().items():
            if hook not in slot or slot[hook].shape[-1] != width:
                slot[hook] = torch.empty(self.batch_size, width, dtype=self.dtype,
                                         device=self.device)
        return slot

    def _widths(self) -> dict[str, int]:
        assert self._segments is not None
        return {h: t.shape[-1] for h, t in self._segments[0].items()}

    def _rows(
        self, start: int, stop: int | None, out: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """Rows start:stop of the buffer in shuffled order (into `out` when given; new
        tensors otherwise, since the buffer's memory is reused by the next fill)."""
        assert self._segments is not None
        stop = self._buffered if stop is None else stop
        if self._order is not None:
            index = self._order[start:stop]
        else:
            index = torch.arange(start, stop, device=self.device)
        if out is None:
            out = {h: torch.empty(stop - start, width, dtype=self.dtype, device=self.device)
                   for h, width in self._widths().items()}
        for segment, placed, local in self._by_segment(index):
            for hook, source in self._segments[segment].items():
                dest = out[hook][placed]
                if source.dtype == dest.dtype:
                    torch.index_select(source, 0, local, out=dest)
                else:
                    dest.copy_(source.index_select(0, local))
        return out

    def _by_segment(self, index: Tensor) -> list[tuple[int, slice, Tensor]]:
        """Splits buffer rows `index` into (segment, slice of the batch, rows within the
        segment), so each segment's rows are gathered straight into one slice of the batch.

        With several segments the batch holds each segment's rows together (in their
        shuffled order within it): the same random set of rows, grouped."""
        assert self._segment_starts is not None
        if not len(self._segment_starts):
            return [(0, slice(0, len(index)), index)]
        segment = torch.bucketize(index, self._segment_starts, right=True)
        index = index[torch.argsort(segment, stable=True)]
        counts = torch.bincount(segment, minlength=len(self._segment_starts) + 1).tolist()
        starts = [0, *self._segment_starts.tolist()]
        pieces, begin = [], 0
        for number, count in enumerate(counts):
            if count:
                placed = slice(begin, begin + count)
                pieces.append((number, placed, index[placed] - starts[number]))
                begin += count
        return pieces

    # norm scaling

    def estimate_norm_scaling_factor(
        self, n_batches: int = 100, *, progress: bool | None = None
    ) -> float | dict[str, float]:
        """s = sqrt(d_in) / E||x|| over about `n_batches * batch_size` rows read from the
        current position (the position itself is left unchanged).

        Multiplying activations by s gives them an average norm of sqrt(d_in) (the
        `expected_average_only_in` normalisation). A float for one hook, a dict for several.
        `progress` shows a bar of the rows read (None: as `saekit.progress` is set).

        E||x|| is the mean row norm without the rows whose norm exceeds OUTLIER_NORM_RATIO
        times the median (`robust_mean_norm`): on data without such rows it is the plain
        mean, and one corrupt row (a norm of 1e30 among thousands) cannot move it. Rows left
        out are reported in a warning; a NaN or infinite row raises NonFiniteActivations.
        """
        if n_batches <= 0:
            raise ValueError(f"n_batches must be positive, got {n_batches}")
        wanted = n_batches * self.batch_size
        saved = self._source_state()
        norms: dict[str, list[Tensor]] = {h: [] for h in self.hooks}
        width: dict[str, int] = {}
        rows = 0
        shown = bar(desc="norm estimate", unit="tok", total=wanted, progress=progress)
        try:
            while rows < wanted:
                chunk = self._next_chunk()
                if chunk is None:
                    break
                for hook in self.hooks:
                    norms[hook].append(chunk[hook].double().norm(dim=-1).cpu())
                    width[hook] = chunk[hook].shape[-1]
                got = chunk[self.hooks[0]].shape[0]
                shown.update(min(got, wanted - rows))
                rows += got
        finally:
            shown.close()
            self._load_source_state(saved)
        if rows == 0:
            raise ValueError("no activations to estimate the norm scaling factor on")
        if rows < wanted:
            logger.warning(
                "estimated the norm scaling factor on %d rows, fewer than the %d asked for "
                "(the data ran out)", rows, wanted,
            )
        factors = {
            h: math.sqrt(width[h]) / robust_mean_norm(torch.cat(norms[h]), h) for h in self.hooks
        }
        return factors[self.hooks[0]] if self.single else factors

    # checkpointing

    def state_dict(self) -> dict[str, Any]:
        """The exact data position and shuffling state, for a training checkpoint.

        Small (no activations beyond the fewer-than-a-batch rows carried into the current
        buffer); restoring re-reads the current buffer's data once."""
        return {
            "version": STATE_VERSION,
            "config": self._config(),
            "cycle": self._cycle,
            "cursor": self._cursor,
            "batches": self._batches,
            "source_now": self._source_state(),
            "rng_now": self._rng.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`: the next batch is the one that would have come."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data position state version {state.get('version')} is not known")
        saved = state["config"]
        diffs = [
            f"{k}: saved {saved.get(k)!r}, now {v!r}"
            for k, v in self._config().items() if saved.get(k) != v
        ]
        if diffs:
            raise ValueError(
                "the saved data position belongs to a different configuration ("
                + "; ".join(diffs) + "); restore with the same settings"
            )
        self._batches = int(state["batches"])
        cycle = state["cycle"]
        if cycle is None:
            self._load_source_state(state["source_now"])
            self._rng.set_state(state["rng_now"])
            self._segments, self._cursor, self._cycle = None, 0, None
            return
        self._load_source_state(cycle["source"])
        self._rng.set_state(cycle["rng"])
        self._fill(cycle["carry"])
        self._cursor = int(state["cursor"])
