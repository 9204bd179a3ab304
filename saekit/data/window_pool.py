"""Token windows drawn in a random order from a pool, so that training batches mix text from
all over a long stretch of the dataset rather than from a few consecutive pages.

A dataset read in order (a book, a corpus of a few long works, a dump sorted by source)
feeds the activation store's shuffle buffer with consecutive windows, so each batch comes
from one passage and dozens of batches in a row from one work. On the bundled model that
non-i.i.d. stream left a quarter of a gated SAE's latents and half of a batch top-k SAE's
dead at L0 32, against a few percent for the same training on shuffled rows
(benchmarks/README.md). Drawing windows from a pool of a million tokens mixes them the way
shuffling a dataset's documents would, for sources that cannot be shuffled up front
(streams) as well as for those that can.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from saekit.data.tokens import TokenWindows, next_windows


class WindowPool:
    """Serves the windows of a `TokenWindows` in a random order: it holds `size` windows, and
    each one served is a random one of them, whose place the source's next window takes.

    Every window of the source is served exactly once; a window read early may be served
    late (the pool empties at the end). The order is fixed by `seed` and the position
    (`state_dict`) includes the pool, so a resumed run serves the same windows in the same
    order. Everything else (framing, special ids, context size) is the source's.
    """

    def __init__(self, source: TokenWindows, size: int, seed: int = 0) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"the window pool's size must be a positive integer, got {size!r}")
        self.source = source
        self.size = size
        self.seed = seed
        self._rng = torch.Generator().manual_seed(seed)
        #: The pooled windows [n, context_size]; None until the first draw fills it.
        self._pool: Tensor | None = None
        self._served = 0

    def __getattr__(self, name: str) -> Any:
        # Called only for names this class lacks: the source's framing, ids and sizes.
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    # position

    def state_dict(self) -> dict[str, Any]:
        return {
            "source": self.source.state_dict(),
            # Token ids fit 32 bits; the position is saved twice per checkpoint (at the
            # buffer's start and now).
            "pool": None if self._pool is None else self._pool.to(torch.int32),
            "rng": self._rng.get_state(),
            "served": self._served,
            "pool_size": self.size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`, with the saved pool's size (a run resumed with a
        longer budget, which sizes a new pool differently, still serves the same windows)."""
        if "pool" not in state:
            raise ValueError(
                "the saved position is of a reader without a window pool; resume with the "
                "run's own settings (shuffle_tokens 0)"
            )
        self.size = int(state["pool_size"])
        self.source.load_state_dict(state["source"])
        pool = state["pool"]
        self._pool = None if pool is None else torch.as_tensor(pool, dtype=torch.long).clone()
        self._rng.set_state(state["rng"])
        self._served = int(state["served"])

    @property
    def windows_emitted(self) -> int:
        """Windows served so far (the source has read up to `size` more)."""
        return self._served

    # iteration

    def __iter__(self) -> WindowPool:
        return self

    def __next__(self) -> Tensor:
        if self._pool is None:
            self._pool = self.source.batch(self.size)
            if self._pool is None:
                self._pool = torch.empty(0, self.source.context_size, dtype=torch.long)
        if self._pool.shape[0] == 0:
            raise StopIteration
        slot = int(torch.randint(self._pool.shape[0], (1,), generator=self._rng))
        window = self._pool[slot].clone()
        incoming = self.source.batch(1)
        if incoming is not None:
            self._pool[slot] = incoming[0]
        else:  # the source is used up: the last window fills the gap, the pool shrinks
            self._pool[slot] = self._pool[-1]
            self._pool = self._pool[:-1]
        self._served += 1
        return window

    def batch(self, n: int) -> Tensor | None:
        """The next `n` windows as [n, context_size] (fewer at the end), or None at the end."""
        return next_windows(self, n)
