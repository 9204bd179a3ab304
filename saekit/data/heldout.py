"""Which text a run evaluates on, so that it is never text the run trained on.

A dataset with a held-out split (test, then validation) is evaluated on that split. A dataset
without one (a local file or folder, a Hub dataset with only a train split, an in-memory
dataset) gives up whole documents instead: every `HELDOUT_STRIDE`-th document from the first
(rows 0, 10, 20, ...), as many as the evaluation reads, and training reads every other row.
The rule needs only each row's position, so a streamed dataset follows it too; the number of
documents held out is saved with the run so that a resumed run skips the same ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from saekit.data.text import HELDOUT_SPLITS, heldout_split, load_text_dataset

#: One document in this many (from the first) is held out, until the evaluation has enough.
HELDOUT_STRIDE = 10
#: The rule in words, for reports and metrics.json.
HELDOUT_RULE = f"every {HELDOUT_STRIDE}th document from the first, never trained on"


def is_heldout_row(index: int, n_heldout: int) -> bool:
    """Whether row `index` is one of the first `n_heldout` held-out documents."""
    return index % HELDOUT_STRIDE == 0 and index // HELDOUT_STRIDE < n_heldout


def heldout_rows(dataset: Any, limit: int | None = None) -> Any:
    """The held-out documents of `dataset` (rows 0, STRIDE, 2 * STRIDE, ...), at most
    `limit` of them, as a dataset of the same kind."""
    return _rows_where(dataset, lambda i: i % HELDOUT_STRIDE == 0 and (
        limit is None or i // HELDOUT_STRIDE < limit
    ))


def training_rows(dataset: Any, n_heldout: int) -> Any:
    """`dataset` without its first `n_heldout` held-out documents."""
    if n_heldout <= 0:
        return dataset
    return _rows_where(dataset, lambda i: not is_heldout_row(i, n_heldout))


def _rows_where(dataset: Any, keep: Any) -> Any:
    import datasets

    if isinstance(dataset, datasets.Dataset):
        return dataset.select([i for i in range(len(dataset)) if keep(i)])
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.filter(lambda _row, i: keep(i), with_indices=True)
    if isinstance(dataset, list):
        return [row for i, row in enumerate(dataset) if keep(i)]
    return _FilteredRows(dataset, keep)


class _FilteredRows:
    """The rows of an iterable whose position passes `keep` (read lazily, as often as the
    iterable itself can be read)."""

    def __init__(self, rows: Any, keep: Any) -> None:
        self._rows, self._keep = rows, keep

    def __iter__(self) -> Iterator[Any]:
        return (row for i, row in enumerate(self._rows) if self._keep(i))


@dataclass(frozen=True)
class EvalTextChoice:
    """Where a run's held-out metrics come from."""

    source: Any
    """The dataset to read (a name, a path or an in-memory dataset)."""
    split: str
    """Its split."""
    from_training_data: bool
    """True: the held-out documents of the training data (`HELDOUT_RULE`)."""


def choose_eval_text(
    train_source: Any, eval_dataset: Any = None, eval_split: str | None = None
) -> EvalTextChoice:
    """Held-out text for a run on `train_source` (read at its train split).

    `eval_dataset` names other text to evaluate on (its `eval_split`, else its test or
    validation split, else all of it); `eval_split` alone names a split of the training
    dataset, which must not be the training split. Without either: the training dataset's
    test or validation split when it has one, else its held-out documents."""
    if eval_dataset is not None and not same_source(eval_dataset, train_source):
        split = eval_split or heldout_split(eval_dataset) or "train"
        return EvalTextChoice(eval_dataset, split, False)
    if eval_split is not None:
        if eval_split == "train":
            raise ValueError(
                "eval_split 'train' is the split the run trains on; name a held-out split "
                f"({' or '.join(HELDOUT_SPLITS)}), other text with eval_dataset, or leave "
                "both out to hold out documents of the training data"
            )
        load_text_dataset(train_source, split=eval_split)  # an unknown split fails here
        return EvalTextChoice(train_source, eval_split, False)
    split = heldout_split(train_source)
    if split is not None:
        return EvalTextChoice(train_source, split, False)
    return EvalTextChoice(train_source, "train", True)


def same_source(a: Any, b: Any) -> bool:
    """Whether two dataset arguments name the same data (paths compared resolved)."""
    if a is b:
        return True
    if isinstance(a, (str, Path)) and isinstance(b, (str, Path)):
        pa, pb = Path(a).expanduser(), Path(b).expanduser()
        if pa.exists() and pb.exists():
            return pa.resolve() == pb.resolve()
        return str(a) == str(b)
    return False


def describe_source(source: Any) -> str:
    """A name for a dataset in reports: its path or Hub id, else its kind."""
    if isinstance(source, (str, Path)):
        return str(source)
    return f"in-memory {type(source).__name__}"


@dataclass
class HeldoutText:
    """The token batches a run evaluates on, and what they are."""

    batches: list[Tensor]
    """Token batches [batch, context_size]."""
    dataset: str
    """The dataset, as a path, Hub id or kind of in-memory object."""
    split: str | None
    """The split read; None for the held-out documents of the training data."""
    heldout_documents: int = 0
    """Documents of the training data held out (`HELDOUT_RULE`); 0 when a split or other
    text is read."""

    @property
    def n_tokens(self) -> int:
        return sum(int(b.numel()) for b in self.batches)

    def to_dict(self) -> dict[str, Any]:
        """For metrics.json: exactly what the metrics were measured on."""
        out: dict[str, Any] = {"dataset": self.dataset, "tokens": self.n_tokens}
        if self.split is None:
            out["held_out_documents"] = self.heldout_documents
            out["rule"] = HELDOUT_RULE
        else:
            out["split"] = self.split
        return out

    def summary(self) -> str:
        """One line for the printed report."""
        where = (
            f"{self.heldout_documents:,} held-out documents of {self.dataset} ({HELDOUT_RULE})"
            if self.split is None
            else f"{self.dataset}, split {self.split}"
        )
        return f"{self.n_tokens:,} tokens of {where}"


def heldout_documents_batches(
    dataset: Any,
    tokenizer: Any,
    n_tokens: int,
    *,
    context_size: int,
    prepend_bos: bool | None,
    limit: int | None = None,
    batch_size: int = 8,
) -> tuple[list[Tensor], int]:
    """(token batches of about `n_tokens` tokens, documents held out) from the held-out
    documents of `dataset` (a loaded dataset, see `load_text_dataset`), at most `limit` of
    them. Every document read counts as held out, including the last one, of which the
    batches may use only part."""
    from saekit.data.tokens import TokenWindows, window_batches

    windows = TokenWindows(
        heldout_rows(dataset, limit), tokenizer, context_size, prepend_bos=prepend_bos
    )
    batches = window_batches(windows, n_tokens, batch_size)
    return batches, windows.rows_read
