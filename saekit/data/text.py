"""Text datasets: loading them and finding their text (or token) column.

A dataset can be a Hub name, a local file (txt, jsonl, json, parquet, csv), a folder written
by `Dataset.save_to_disk` or holding such files, an in-memory `datasets.Dataset` /
`IterableDataset`, or any iterable of strings or of dicts.
"""

from __future__ import annotations

import codecs
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from saekit.errors import SaekitError, looks_like_path, no_such_path_message

logger = logging.getLogger(__name__)

#: Local file suffixes and the `datasets` builder that reads them.
FILE_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
#: Builders whose files are text, checked (UTF-8, not empty, not binary) before reading.
TEXT_BUILDERS = ("text", "json", "csv")
#: Column names tried, in order, when no text column is named.
TEXT_COLUMNS = ("text", "content", "document", "story", "body", "raw_content", "sentence")
#: Column names that hold pre-tokenized data.
TOKEN_COLUMNS = ("input_ids", "tokens")


#: The name that stands for the corpus shipped with saekit (see saekit/assets/corpus).
BUNDLED_DATASET = "bundled"


def _bundled_split(split: str) -> list[str]:
    from saekit.assets import corpus

    if split == "train":
        return corpus.train_texts()
    if split in ("test", "validation"):
        return corpus.heldout_texts()
    raise ValueError(
        f"the bundled corpus has splits train and test (held-out works), not {split!r}"
    )


#: Splits a run evaluates on when the dataset has them, in order of preference.
HELDOUT_SPLITS = ("test", "validation")


class UnknownSplitError(ValueError):
    """A split that the dataset does not have; the message names the ones it has."""

    def __init__(self, split: str, source: Any, splits: list[str]) -> None:
        self.splits = list(splits)
        super().__init__(
            f"the dataset {_describe(source)} has no split {split!r}; its splits are "
            f"{', '.join(self.splits) or '(none found)'}"
        )


def _describe(source: Any) -> str:
    return str(source) if isinstance(source, (str, Path)) else f"({type(source).__name__})"


def load_text_dataset(
    source: Any,
    *,
    split: str = "train",
    streaming: bool = False,
    trust_remote_code: bool = False,
) -> Any:
    """The dataset behind `source`, as a `datasets` object or the iterable itself.

    Args:
        source: a path (file or folder), a Hub name, "bundled" (the demo corpus:
            split "train" is its training works, "test" / "validation" the held-out ones), a
            `Dataset`, `IterableDataset`, `DatasetDict` (its `split` is taken), or an iterable
            of strings / dicts.
        split: the split to read. A local file is one split, "train"; a folder has the splits
            its file and folder names say (`train.jsonl` and `test.jsonl`, or `train/` and
            `test/`), else only "train". In-memory datasets and iterables are read whole
            whatever the split. A split the dataset lacks is an `UnknownSplitError` naming
            the ones it has.
        streaming: stream a Hub dataset instead of downloading it whole.
        trust_remote_code: allow a Hub dataset's loading script to run (off by default).
    """
    import datasets

    if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in source:
            raise UnknownSplitError(split, source, list(source))
        return source[split]
    if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        return source
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if path.exists():
            return _load_local(path, split)
        if source == BUNDLED_DATASET:
            return _bundled_split(split)
        if looks_like_path(source, tuple(FILE_BUILDERS)):
            # A file name, or a path into a folder that exists, is never a Hub dataset.
            raise FileNotFoundError(
                no_such_path_message(source, "dataset file or folder")
                + "; pass an existing file or folder, or a Hub dataset name (owner/name)"
            )
        kwargs: dict[str, Any] = {"split": split, "streaming": streaming}
        if trust_remote_code:
            kwargs["trust_remote_code"] = True
        try:
            return datasets.load_dataset(str(source), **kwargs)
        except ValueError as err:
            if "Unknown split" not in str(err):
                raise
            raise UnknownSplitError(split, source, hub_splits(str(source)) or []) from None
    if isinstance(source, Iterable):
        return _OneShot(source) if iter(source) is source else source
    raise TypeError(
        f"cannot read a dataset from a {type(source).__name__}; pass a path, a Hub name, a "
        "datasets.Dataset or an iterable of texts"
    )


def dataset_splits(source: Any) -> list[str] | None:
    """The splits `source` has, or None when it is not split (an in-memory dataset or
    iterable, read whole) or its splits cannot be listed (a Hub dataset out of reach)."""
    import datasets

    if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return list(source)
    if not isinstance(source, (str, Path)):
        return None
    path = Path(source).expanduser()
    if path.is_file():
        return ["train"]
    if path.is_dir():
        if (path / "dataset_dict.json").exists():
            return list(datasets.load_from_disk(str(path)))
        if (path / "dataset_info.json").exists():
            return ["train"]
        return list(_local_split_files(path)) or ["train"]
    if source == BUNDLED_DATASET:
        return ["train", "test", "validation"]
    return hub_splits(str(source))


def hub_splits(name: str) -> list[str] | None:
    """A Hub dataset's split names, or None when they cannot be read (offline, private)."""
    import datasets

    try:
        return list(datasets.get_dataset_split_names(name))
    except Exception:  # noqa: BLE001 - any failure means "unknown", which callers handle
        return None


def heldout_split(source: Any) -> str | None:
    """The first of test, validation that `source` has, or None."""
    splits = dataset_splits(source) or []
    return next((s for s in HELDOUT_SPLITS if s in splits), None)


class _OneShot:
    """An iterator whose first row can be looked at (to find its columns) without losing it.

    It can be iterated once only, so reading it cannot resume from a saved position."""

    def __init__(self, iterator: Iterator[Any]) -> None:
        self._iterator = iterator
        self.first_row = next(iterator, None)
        self._started = False

    def __iter__(self) -> Iterator[Any]:
        if self._started:
            raise RuntimeError(
                "this dataset is a one-shot iterator and was already read; pass a list, a "
                "datasets.Dataset or a path to read it again or resume it"
            )
        self._started = True
        if self.first_row is not None:
            yield self.first_row
        yield from self._iterator


def _first_row(dataset: Any) -> Any:
    if isinstance(dataset, _OneShot):
        return dataset.first_row
    return next(iter(dataset), None)


def _load_local(path: Path, split: str) -> Any:
    import datasets

    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.Dataset) and split != "train":
                raise UnknownSplitError(split, path, ["train"])
            return load_text_dataset(loaded, split=split)
        splits = _local_split_files(path)
        if not splits:
            raise ValueError(
                f"folder {path} holds no dataset: expected a folder written by "
                f"Dataset.save_to_disk or files ending in {', '.join(FILE_BUILDERS)}"
            )
        if split not in splits:
            raise UnknownSplitError(split, path, list(splits))
        files = splits[split]
        builders = {FILE_BUILDERS[Path(p).suffix.lower()] for p in files}
        if len(builders) > 1:
            raise ValueError(
                f"folder {path} mixes file kinds ({', '.join(sorted(builders))}); keep one kind "
                "per dataset folder"
            )
        for file in files:
            if FILE_BUILDERS[Path(file).suffix.lower()] in TEXT_BUILDERS:
                check_text_file(Path(file), allow_empty=True)  # one empty file of many is fine
        return _load_files(builders.pop(), files, path)
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(
            f"cannot read {path}: its suffix {path.suffix!r} is not one of "
            f"{', '.join(FILE_BUILDERS)}"
        )
    if split != "train":
        raise UnknownSplitError(split, path, ["train"])
    if builder in TEXT_BUILDERS:
        check_text_file(path)
    return _load_files(builder, str(path), path)


def _load_files(builder: str, files: str | list[str], where: Path) -> Any:
    """`datasets.load_dataset` on local files; a file it cannot parse (a JSON line that is
    not JSON, a ragged CSV) is a ValueError naming the file and the parser's reason."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    try:
        return datasets.load_dataset(builder, data_files=files, split="train")
    except DatasetGenerationError as err:
        cause = err.__cause__ or err.__context__ or err
        reason = " ".join(str(cause).split())[:300]
        raise ValueError(
            f"cannot read {where} as {builder} data: {reason}; fix the file or pass another one"
        ) from err


def _local_split_files(folder: Path) -> dict[str, list[str]]:
    """{split: data files} of a folder of files, by the names `datasets` gives splits
    (`test.jsonl`, `valid/`, ...); every file is "train" when no name says otherwise."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        found = DataFilesDict.from_patterns(get_data_patterns(str(folder)), base_path=str(folder))
    except Exception:  # noqa: BLE001 - no recognisable file at all
        return {}
    out: dict[str, list[str]] = {}
    for split, files in found.items():
        kept = sorted(str(f) for f in files if Path(str(f)).suffix.lower() in FILE_BUILDERS)
        if kept:
            out[str(split)] = kept
    return out


def column_names(dataset: Any) -> list[str] | None:
    """The dataset's column names, or None for a plain iterable of strings."""
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return list(names)
    features = getattr(dataset, "features", None)
    if features is not None:
        return list(features)
    first = _first_row(dataset)
    if isinstance(first, dict):
        return list(first)
    return None


def find_column(dataset: Any, text_column: str | None = None) -> tuple[str | None, bool]:
    """(column, is_tokenized) for a dataset: the named column, else a token column
    (`input_ids` / `tokens`), else the first usual text column, else the only string column.

    The column is None for an iterable of plain strings."""
    names = column_names(dataset)
    if names is None:
        return None, False
    if text_column is not None:
        if text_column not in names:
            raise ValueError(
                f"the dataset has no column {text_column!r}; its columns are {names}"
            )
        return text_column, text_column in TOKEN_COLUMNS
    for name in TOKEN_COLUMNS:
        if name in names:
            return name, True
    for name in TEXT_COLUMNS:
        if name in names:
            return name, False
    string_columns = _string_columns(dataset, names)
    if len(string_columns) == 1:
        return string_columns[0], False
    raise ValueError(
        f"cannot tell which column holds the text; the dataset's columns are {names}. "
        "Name one with text_column= (--text-column on the command line)"
    )


def _string_columns(dataset: Any, names: list[str]) -> list[str]:
    features = getattr(dataset, "features", None)
    if features is not None:
        text_dtypes = ("string", "large_string")
        return [n for n in names if getattr(features[n], "dtype", None) in text_dtypes]
    first = _first_row(dataset)
    if isinstance(first, dict):
        return [n for n in names if isinstance(first.get(n), str)]
    return []


def iter_rows(dataset: Any, start: int = 0) -> Iterator[Any]:
    """The dataset's rows from index `start` on (map-style datasets jump there directly)."""
    import itertools

    import datasets

    if isinstance(dataset, datasets.Dataset):
        if start >= len(dataset):
            return iter(())
        return iter(dataset.select(range(start, len(dataset))) if start else dataset)
    if isinstance(dataset, datasets.IterableDataset):
        return iter(dataset.skip(start) if start else dataset)
    return itertools.islice(iter(dataset), start, None)


#: Bytes read at a time when checking a text file.
_CHUNK_BYTES = 1 << 20
#: Bytes at the start of a file searched for NUL bytes, which text never holds.
_BINARY_PROBE_BYTES = 8192


def check_text_file(path: Path, allow_empty: bool = False) -> None:
    """Refuse a local text file (txt, jsonl, json, csv) that holds no text (unless
    `allow_empty`), is binary, or is not UTF-8, naming the byte and line of the first bad
    byte.

    Files are read strictly as UTF-8: decoding with replacement characters would train on
    garbled text without anyone noticing, so the user re-encodes the file once instead."""
    size = path.stat().st_size
    if size == 0 and allow_empty:
        return
    if size == 0:
        raise SaekitError(f"{path} holds no text (the file is empty); pass a file with text in it")
    with path.open("rb") as handle:
        head = handle.read(_BINARY_PROBE_BYTES)
        nul = head.find(b"\0")
        if nul >= 0:
            raise SaekitError(
                f"{path} is a binary file, not text (a NUL byte at byte offset {nul}); pass a "
                "UTF-8 text file"
            )
        handle.seek(0)
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        offset, line, blank = 0, 1, True
        while chunk := handle.read(_CHUNK_BYTES):
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as err:
                # err.object is the bytes held back from the last chunk, then this one.
                at = offset - (len(err.object) - len(chunk)) + err.start
                line += err.object[: err.start].count(b"\n")
                bad = err.object[err.start : err.start + 1].hex()
                raise SaekitError(
                    f"{path} is not UTF-8 text: byte 0x{bad} at byte offset {at} (line {line}) "
                    f"is not valid UTF-8 ({err.reason}); the file is probably in another "
                    "encoding such as latin-1 or cp1252. Re-encode it as UTF-8, e.g. "
                    f"`iconv -f latin1 -t utf-8 {path} > utf8.txt`"
                ) from None
            blank = blank and not text.strip()
            line += chunk.count(b"\n")
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as err:
            raise SaekitError(
                f"{path} is not UTF-8 text: it ends inside a multi-byte character at byte "
                f"offset {offset - len(err.object) + err.start}; the file is cut short or in "
                "another encoding. Re-encode it as UTF-8"
            ) from None
    if blank and not allow_empty:
        raise SaekitError(
            f"{path} holds no text (only white space); pass a file with text in it"
        )
