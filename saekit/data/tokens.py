"""Text to fixed-length token windows: tokenizing, packing, and resuming at a position."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from saekit.data.text import find_column, iter_rows, load_text_dataset


def special_token_ids(tokenizer: Any) -> set[int]:
    """BOS, EOS, pad and every other special token id of a tokenizer (empty for None)."""
    if tokenizer is None:
        return set()
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            ids.add(int(value))
    return ids


def keep_mask(tokens: Tensor, exclude_ids: set[int] | Tensor) -> Tensor:
    """Boolean [batch, pos] mask, True where the token is not one of `exclude_ids`."""
    if not isinstance(exclude_ids, Tensor):
        if not exclude_ids:
            return torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
        exclude_ids = torch.tensor(sorted(exclude_ids), device=tokens.device)
    return ~torch.isin(tokens, exclude_ids.to(tokens.device))


#: How windows are framed with special tokens: BOS first, the tokenizer's own, or none.
FRAMINGS = ("bos", "tokenizer", "none")


def sequence_framing(tokenizer: Any, prepend_bos: bool | None) -> tuple[str, list[int], list[int]]:
    """(framing, ids before, ids after) the text of each window.

    prepend_bos True is BOS first (an error when the tokenizer has none), False is no special
    tokens. None follows the tokenizer: its own special tokens when it adds more than a BOS
    (BERT's [CLS] ... [SEP], T5's trailing </s>), else BOS when it has one (GPT-2, whose
    tokenizer adds nothing, as TransformerLens does; Llama, whose tokenizer adds BOS), else
    nothing (Qwen)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if prepend_bos is True:
        if bos is None:
            raise ValueError(
                "the tokenizer has no BOS token; leave prepend_bos unset (the tokenizer's own "
                "special tokens are used) or pass prepend_bos=False"
            )
        return "bos", [int(bos)], []
    if prepend_bos is False or tokenizer is None:
        return "none", [], []
    prefix, suffix = _tokenizer_frame(tokenizer)
    if (prefix or suffix) and (prefix, suffix) != ([bos], []):
        return "tokenizer", prefix, suffix
    if bos is not None:
        return "bos", [int(bos)], []
    return "none", [], []


def _tokenizer_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special-token ids the tokenizer puts before and after a text of its own."""
    try:
        plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
        framed = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    except (TypeError, ValueError, KeyError):
        return [], []
    for start in range(len(framed) - len(plain) + 1):
        if framed[start : start + len(plain)] == plain:
            return framed[:start], framed[start + len(plain) :]
    return [], []


class TokenWindows:
    """Token windows [context_size] from a dataset, in order, resumable at any window.

    Packing (the default) joins documents into one stream, a separator token between them,
    and cuts it into windows; each window is framed as `prepend_bos` says (see
    `sequence_framing`): BOS followed by `context_size - 1` stream tokens, the tokenizer's
    own special tokens around the stream tokens (BERT: [CLS] ... [SEP]), or nothing. Without
    packing, each document is one window, truncated, and padded with the pad token (which is
    masked out of training like the other special tokens). Pre-tokenized datasets
    (`input_ids` or `tokens` column) are used as they are: rows are joined and cut into
    windows with nothing added, after checking every id fits the vocabulary.

    Args:
        dataset: anything `load_text_dataset` reads (path, Hub name, Dataset, iterable).
        tokenizer: a transformers tokenizer; needed for text, optional for token ids.
        context_size: tokens per window.
        text_column: the column to read; found automatically when None.
        prepend_bos: True: start each window with the tokenizer's BOS token; False: no
            special tokens; None: what the tokenizer itself does (`sequence_framing`).
            Text only: pre-tokenized rows are used as they are.
        packing: pack documents into windows (True) or one document per window (False).
        separator_token_id: token placed between packed documents; "eos" (the default)
            means the tokenizer's EOS token (BOS when it has none), None means nothing.
        vocab_size: ids must be below this; defaults to `len(tokenizer)`.
        tokenize_batch: documents tokenized per call (fast tokenizers batch internally).
        split, streaming, trust_remote_code: as in `load_text_dataset`.
    """

    def __init__(
        self,
        dataset: Any,
        tokenizer: Any,
        context_size: int,
        *,
        text_column: str | None = None,
        prepend_bos: bool | None = True,
        packing: bool = True,
        separator_token_id: int | str | None = "eos",
        vocab_size: int | None = None,
        tokenize_batch: int = 64,
        split: str = "train",
        streaming: bool = False,
        trust_remote_code: bool = False,
    ) -> None:
        if not isinstance(context_size, int) or context_size < 2:
            raise ValueError(f"context_size must be an integer >= 2, got {context_size!r}")
        self.dataset = load_text_dataset(
            dataset, split=split, streaming=streaming, trust_remote_code=trust_remote_code
        )
        self.tokenizer = tokenizer
        self.context_size = context_size
        self.column, self.pretokenized = find_column(self.dataset, text_column)
        self.packing = packing
        self.tokenize_batch = tokenize_batch
        if tokenizer is None and not self.pretokenized:
            raise ValueError(
                "this dataset holds text, so a tokenizer is needed; pass the model's tokenizer "
                "or use a pre-tokenized dataset (saekit pretokenize)"
            )
        self.vocab_size = vocab_size if vocab_size is not None else (
            len(tokenizer) if tokenizer is not None else None
        )
        self.bos_id = getattr(tokenizer, "bos_token_id", None)
        self.framing, self._prefix, self._suffix = (
            ("none", [], []) if self.pretokenized else sequence_framing(tokenizer, prepend_bos)
        )
        #: Whether windows start with BOS (the SAELens metadata field of that name).
        self.prepend_bos = self.framing == "bos"
        if context_size <= len(self._prefix) + len(self._suffix):
            raise ValueError(
                f"context_size={context_size} leaves no room for text between the "
                f"{len(self._prefix) + len(self._suffix)} special tokens of each window"
            )
        eos = getattr(tokenizer, "eos_token_id", None)
        if separator_token_id == "eos":
            separator_token_id = eos if eos is not None else self.bos_id
        self.separator_id = None if self.pretokenized else separator_token_id
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (eos if eos is not None else 0)
        self.special_ids = special_token_ids(tokenizer)
        if not packing:
            self.special_ids.add(int(self.pad_id))
        self._rows_read = 0
        # Tokens read but not yet emitted, as tensors (never written in place): saving the
        # position is then a copy of memory, not a conversion of Python ints (which took
        # 36 ms per batch for a book-length document).
        self._pending = torch.empty(0, dtype=torch.long)
        self._pending_docs: list[Tensor] = []
        self._windows = 0
        self._rows: Iterator[Any] | None = None

    # position

    def state_dict(self) -> dict[str, Any]:
        """The position in the data: rows read, tokens read but not yet emitted."""
        return {
            "rows_read": self._rows_read,
            # Copies: `_pending` is a view into a larger tensor, which would be saved whole.
            "pending": self._pending.clone(),
            "pending_docs": list(self._pending_docs),
            "windows": self._windows,
            "context_size": self.context_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["context_size"] != self.context_size:
            raise ValueError(
                f"the saved position is for context_size={state['context_size']}, this "
                f"dataset reader uses {self.context_size}"
            )
        self._rows_read = int(state["rows_read"])
        self._pending = torch.as_tensor(state["pending"], dtype=torch.long).clone()
        self._pending_docs = [torch.as_tensor(d, dtype=torch.long) for d in state["pending_docs"]]
        self._windows = int(state["windows"])
        self._rows = None

    @property
    def rows_read(self) -> int:
        """Dataset rows read so far (tokenized, whether or not emitted in a window yet)."""
        return self._rows_read

    @property
    def windows_emitted(self) -> int:
        return self._windows

    # iteration

    def __iter__(self) -> TokenWindows:
        return self

    def __next__(self) -> Tensor:
        window = self._next_packed() if self.packing else self._next_unpacked()
        if window is None:
            raise StopIteration
        self._windows += 1
        return window

    def batch(self, n: int) -> Tensor | None:
        """The next `n` windows as [n, context_size] (fewer at the end), or None at the end."""
        return next_windows(self, n)

    def _next_packed(self) -> Tensor | None:
        body = self.context_size - len(self._prefix) - len(self._suffix)
        if len(self._pending) < body:
            parts, have = [self._pending], len(self._pending)
            separator = [] if self.separator_id is None else [int(self.separator_id)]
            while have < body:
                docs = self._read_docs()
                if docs is None:
                    self._pending = torch.cat(parts)
                    return None  # the last partial window is dropped
                for doc in docs:
                    parts.append(torch.tensor(doc + separator, dtype=torch.long))
                    have += len(parts[-1])
            self._pending = torch.cat(parts)
        window, self._pending = self._pending[:body], self._pending[body:]
        return self._framed(window)

    def _framed(self, body: Tensor) -> Tensor:
        if not self._prefix and not self._suffix:
            return body.clone()
        prefix = torch.tensor(self._prefix, dtype=torch.long)
        suffix = torch.tensor(self._suffix, dtype=torch.long)
        return torch.cat([prefix, body, suffix])

    def _next_unpacked(self) -> Tensor | None:
        while not self._pending_docs:
            docs = self._read_docs()
            if docs is None:
                return None
            self._pending_docs = [torch.tensor(d, dtype=torch.long) for d in docs if d]
        doc = self._pending_docs.pop(0)
        body = self.context_size - len(self._prefix) - len(self._suffix)
        window = self._framed(doc[:body])
        padding = torch.full((self.context_size - len(window),), int(self.pad_id))
        return torch.cat([window, padding])

    def _read_docs(self) -> list[list[int]] | None:
        """Token ids of the next few documents, or None when the data is exhausted."""
        if self._rows is None:
            self._rows = iter_rows(self.dataset, self._rows_read)
        rows = []
        chars = 0
        for row in self._rows:
            rows.append(row)
            value = row if self.column is None else row[self.column]
            chars += len(value) if isinstance(value, str) else 0
            # Long documents: tokenize about a million characters at a time, not 64 books.
            if len(rows) == self.tokenize_batch or chars >= 1_000_000:
                break
        if not rows:
            return None
        self._rows_read += len(rows)
        values = [row if self.column is None else row[self.column] for row in rows]
        if self.pretokenized:
            return [self._checked_ids(v) for v in values]
        texts = [v for v in values if isinstance(v, str) and v]
        if len(texts) != len([v for v in values if v]):
            bad = next(v for v in values if v and not isinstance(v, str))
            raise ValueError(
                f"column {self.column!r} holds {type(bad).__name__} values, not text; name the "
                "text column with text_column="
            )
        if not texts:
            return []
        encoded = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return [list(ids) for ids in encoded]

    def _checked_ids(self, value: Any) -> list[int]:
        ids = value.tolist() if hasattr(value, "tolist") else list(value)
        if ids and self.vocab_size is not None:
            low, high = min(ids), max(ids)
            if low < 0 or high >= self.vocab_size:
                raise ValueError(
                    f"pre-tokenized row {self._rows_read} holds token id "
                    f"{high if high >= self.vocab_size else low}, outside the model's "
                    f"vocabulary of {self.vocab_size}; was it tokenized for another model?"
                )
        return [int(t) for t in ids]


def next_windows(windows: Iterator[Tensor], n: int) -> Tensor | None:
    """The next `n` windows of an iterator of windows, stacked [n, context_size] (fewer at
    the end), or None when it has none left."""
    taken = list(itertools.islice(windows, n))
    return torch.stack(taken) if taken else None


def window_batches(windows: TokenWindows, n_tokens: int, batch_size: int = 8) -> list[Tensor]:
    """Batches [batch_size, context_size] of a `TokenWindows` covering about `n_tokens`
    tokens (fewer, with a warning, when the text runs out first)."""
    context_size = windows.context_size
    n_windows = math.ceil(n_tokens / context_size)
    batches: list[Tensor] = []
    got = 0
    while got < n_windows:
        batch = windows.batch(min(batch_size, n_windows - got))
        if batch is None:
            break
        batches.append(batch)
        got += batch.shape[0]
    if not batches:
        raise ValueError("the evaluation dataset produced no tokens")
    if got < n_windows:
        logging.getLogger(__name__).warning(
            "the evaluation dataset holds only %d tokens of the %d asked for",
            got * context_size,
            n_tokens,
        )
    return batches
