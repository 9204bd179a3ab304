"""One pass over held-out token batches, as every evaluation loop makes it: each batch checked
to be [batch, pos], a progress bar of the tokens read, an optional token budget, and a clear
error when there was nothing to evaluate."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from saekit.progress import bar


class TokenPass:
    """Iterate over `token_batches` for an evaluation: yields each [batch, pos] batch in turn,
    stopping once `max_tokens` tokens (counted before any masking) have been read.

    With `whole_rows`, the batch that would pass `max_tokens` is cut to the sequences that fit
    (at least one), so no more than about `max_tokens` are read; without it, that batch is read
    whole. A batch of another shape is a ValueError, and so is a pass that read no tokens (raised
    when the iteration ends). `seen` counts the tokens read so far."""

    def __init__(
        self,
        token_batches: Iterable[Tensor],
        *,
        desc: str,
        max_tokens: int | None = None,
        progress: bool | None = None,
        whole_rows: bool = False,
    ) -> None:
        self.token_batches = token_batches
        self.desc = desc
        self.max_tokens = max_tokens
        self.progress = progress
        self.whole_rows = whole_rows
        self.seen = 0

    def __iter__(self) -> Iterator[Tensor]:
        max_tokens = self.max_tokens
        total = max_tokens
        if isinstance(self.token_batches, (list, tuple)):  # in memory: count them up front
            held = sum(t.numel() for t in self.token_batches if isinstance(t, Tensor))
            total = held if max_tokens is None else min(held, max_tokens)
        shown = bar(desc=self.desc, unit="tok", total=total, progress=self.progress)
        with shown:
            for tokens in self.token_batches:
                if max_tokens is not None and self.seen >= max_tokens:
                    break
                if tokens.ndim != 2:
                    raise ValueError(
                        f"token batches must be [batch, pos], got {tuple(tokens.shape)}"
                    )
                if (
                    self.whole_rows and max_tokens is not None
                    and self.seen + tokens.numel() > max_tokens
                ):
                    # Whole sequences only: keeping rows whole keeps the count of predictions
                    # simple to reason about.
                    tokens = tokens[: max(1, (max_tokens - self.seen) // tokens.shape[1])]
                yield tokens
                self.seen += tokens.numel()
                shown.update(tokens.numel())
        if self.seen == 0:
            raise ValueError("the token batches were empty; nothing to evaluate")


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """`module` in eval mode for the block, then back in the mode it was in (also when the
    block raises)."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
