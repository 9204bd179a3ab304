"""Labelled texts for the probing evaluations (sparse probing, SCR, TPP).

A `ProbeDataset` is a list of texts with one or two label columns and a fixed train/test
split. Four are built in, cut from the bundled Shakespeare + Milton corpus; their labels come
from the table of works below (who wrote it, its genre, when), never from a model:

- `author`: Shakespeare vs Milton passages.
- `genre`: Shakespeare comedy vs tragedy (First Folio categories).
- `folio`: the three First Folio categories, comedy, history and tragedy; one-vs-rest tasks
  (TPP's default).
- `author_form`: two labels per passage, for SCR: form (`drama`: plays and Milton's masque
  Comus; `poem`: non-dramatic verse) and author. Shakespeare's drama and Milton's poems are
  the bulk of the corpus, so the two labels are correlated, as SCR needs; Shakespeare's poems
  and Comus fill the other two quadrants.
- `genre_period`: two labels per passage, for SCR: genre (comedy / tragedy) and period
  (`early`: written before 1600, `late`: 1600 on). Also correlated in the canon (most early
  plays are comedies, most late ones tragedies), but both are weakly encoded by the bundled
  model, so its SCR figures on it are mostly noise.

Genre follows the First Folio (1623), with two exceptions: the late romances (The Tempest
and The Winter's Tale, filed as comedies; Cymbeline, filed as a tragedy; Pericles, not in
the Folio) get their own genre, `romance`, and Troilus and Cressida, which the Folio prints
between the histories and the tragedies, gets `problem`; neither takes part in any task, so
the classes stay uncontroversial. Measure for Measure and All's Well stay comedies, as in the
Folio. Years are the usual composition dates (the Oxford chronology, rounded to one year).

Passages are runs of whole lines of one work, at most `PASSAGE_CHARS` characters (about 125
tokens for the bundled tokenizer, so most fit a 128-token context), taken from the work's own
text: title pages, cast lists and editors' introductions, notes and indexes are skipped (see
`WorkInfo.start` / `end`), as are passages shorter than `MIN_PASSAGE_CHARS` or mostly not
letters; margin line numbers and indentation are removed, so that editions' layout does not
give the author away. Milton's Latin and Greek poems (`poemata`) are left out: the corpus
holds Cowper's English translation of them, not Milton's words. Two Milton collections mix
poems with Comus, so they count for `author` but have no form.

Any other labelled data loads with `load_probe_dataset` (CSV, JSONL, or whatever
`saekit.data.text.load_text_dataset` reads); `resolve_probe_datasets` takes built-in names
and such sources alike.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

#: Longest passage, in characters.
PASSAGE_CHARS = 400
#: Shortest passage kept, in characters (without surrounding white space).
MIN_PASSAGE_CHARS = 200
#: The seed of the built-in datasets' sampling and split: fixed, so that every evaluation
#: reads the same texts and their activations are computed once.
DATA_SEED = 0
#: Fewest rows a class of a user dataset may have (some go to training, some to testing).
MIN_ROWS_PER_CLASS = 4
#: Column names tried, in order, when no label column is named.
LABEL_COLUMNS = ("label", "labels", "class", "category", "target")


class WorkInfo(NamedTuple):
    """What is known of one work of the bundled corpus.

    author: "shakespeare" or "milton"; genre: comedy, tragedy, history, romance, problem
    (plays), poem, prose or masque; year: composition (first publication for collections);
    start / end: the work's own text lies after the first `start` and before the first `end`
    (None: from the beginning / to the end; plays start at their first "ACT I" line);
    in_tasks: False keeps the work out of every built-in dataset."""

    author: str
    genre: str
    year: int
    start: str | None = None
    end: str | None = None
    in_tasks: bool = True


_BY_WS = "by William Shakespeare"

#: The works of `saekit.assets.corpus`, by name.
WORKS: dict[str, WorkInfo] = {
    "alls_well_that_ends_well": WorkInfo("shakespeare", "comedy", 1604),
    "antony_and_cleopatra": WorkInfo("shakespeare", "tragedy", 1606),
    "as_you_like_it": WorkInfo("shakespeare", "comedy", 1599),
    "comedy_of_errors": WorkInfo("shakespeare", "comedy", 1594),
    "coriolanus": WorkInfo("shakespeare", "tragedy", 1608),
    "cymbeline": WorkInfo("shakespeare", "romance", 1609),
    "hamlet": WorkInfo("shakespeare", "tragedy", 1600),
    "henry_iv_part_1": WorkInfo("shakespeare", "history", 1596),
    "henry_iv_part_2": WorkInfo("shakespeare", "history", 1597),
    "henry_v": WorkInfo("shakespeare", "history", 1599),
    "henry_vi_part_1": WorkInfo("shakespeare", "history", 1591),
    "henry_vi_part_2": WorkInfo("shakespeare", "history", 1591),
    "henry_vi_part_3": WorkInfo("shakespeare", "history", 1591),
    "henry_viii": WorkInfo("shakespeare", "history", 1613),
    "john": WorkInfo("shakespeare", "history", 1596),
    "julius_caesar": WorkInfo("shakespeare", "tragedy", 1599),
    "lear": WorkInfo("shakespeare", "tragedy", 1605),
    "lovers_complaint": WorkInfo("shakespeare", "poem", 1609, start=_BY_WS),
    "loves_labours_lost": WorkInfo("shakespeare", "comedy", 1595),
    "macbeth": WorkInfo("shakespeare", "tragedy", 1606),
    "measure_for_measure": WorkInfo("shakespeare", "comedy", 1603),
    "merchant_of_venice": WorkInfo("shakespeare", "comedy", 1596),
    "merry_wives_of_windsor": WorkInfo("shakespeare", "comedy", 1597),
    "midsummer_nights_dream": WorkInfo("shakespeare", "comedy", 1595),
    "much_ado_about_nothing": WorkInfo("shakespeare", "comedy", 1598),
    "othello": WorkInfo("shakespeare", "tragedy", 1603),
    "passionate_pilgrim": WorkInfo("shakespeare", "poem", 1599, start=_BY_WS),
    "pericles": WorkInfo("shakespeare", "romance", 1607),
    "phoenix_and_the_turtle": WorkInfo("shakespeare", "poem", 1601, start=_BY_WS),
    "rape_of_lucrece": WorkInfo("shakespeare", "poem", 1594, start="THE ARGUMENT"),
    "richard_ii": WorkInfo("shakespeare", "history", 1595),
    "richard_iii": WorkInfo("shakespeare", "history", 1592),
    "romeo_and_juliet": WorkInfo("shakespeare", "tragedy", 1595),
    "sonnets": WorkInfo("shakespeare", "poem", 1609, start=_BY_WS),
    "taming_of_the_shrew": WorkInfo("shakespeare", "comedy", 1590),
    "tempest": WorkInfo("shakespeare", "romance", 1610),
    "timon_of_athens": WorkInfo("shakespeare", "tragedy", 1605),
    "tragedy_of_titus_andronicus": WorkInfo("shakespeare", "tragedy", 1592),
    "troilus_and_cressida": WorkInfo("shakespeare", "problem", 1602),
    "twelfth_night": WorkInfo("shakespeare", "comedy", 1601),
    "two_gentlemen_of_verona": WorkInfo("shakespeare", "comedy", 1590),
    "winters_tale": WorkInfo("shakespeare", "romance", 1610),
    "areopagitica": WorkInfo("milton", "prose", 1644, start="Euripid."),
    # The 1890 edition: an introduction, the masque, then the editor's notes and index.
    "comus": WorkInfo("milton", "masque", 1634, start="THE PERSONS.", end="\nNOTES.\n"),
    # Collections mixing poems with the masque Comus (and, in the 1673 one, Samson
    # Agonistes): their passages have no single form.
    "lallegro_il_penseroso_comus_and_lycidas": WorkInfo("milton", "collection", 1645),
    "paradise_lost_(no_introduction)": WorkInfo("milton", "poem", 1667),
    "paradise_regained": WorkInfo("milton", "poem", 1671),
    "poemata": WorkInfo("milton", "poem", 1645, in_tasks=False),
    # The 1673 collection; before "MISCELLANEOUS POEMS." are the editor's preface and notes.
    "poetical_works": WorkInfo(
        "milton", "collection", 1673, start="MISCELLANEOUS POEMS.", end="\nAPPENDIX."
    ),
}

_PLAY_GENRES = ("comedy", "tragedy", "history", "romance", "problem")
#: Line numbers printed in the margin (after a run of spaces at the end of a verse line).
_MARGIN_NUMBER = re.compile(r"\s{2,}\d+\s*$")
_FIRST_ACT = re.compile(r"^[ \t]*ACT\s+(I|1|FIRST)\b", re.MULTILINE | re.IGNORECASE)


@dataclass(frozen=True)
class ProbeTask:
    """One binary probing task: rows of a `ProbeDataset` with labels 1 (positive) / 0.

    `name` is "a / b" for a two-class column, else the positive class (one-vs-rest)."""

    name: str
    column: str
    positive: str
    train_idx: np.ndarray
    train_y: np.ndarray
    test_idx: np.ndarray
    test_y: np.ndarray


@dataclass(frozen=True)
class ProbeDataset:
    """Texts, one or two label columns and a fixed train/test split.

    labels: column name -> one class label per text; classes: column name -> its classes
    in a fixed order (the first class is the positive one of a two-class column);
    is_test: per text, whether it belongs to the test split."""

    name: str
    texts: tuple[str, ...]
    labels: Mapping[str, tuple[str, ...]]
    classes: Mapping[str, tuple[str, ...]]
    is_test: tuple[bool, ...]

    def __post_init__(self) -> None:
        n = len(self.texts)
        if not 1 <= len(self.labels) <= 2:
            raise ValueError(
                f"a probe dataset has one or two label columns, not {len(self.labels)}"
            )
        for column, values in self.labels.items():
            if len(values) != n:
                raise ValueError(f"label column {column!r} has {len(values)} values for {n} texts")
            if set(values) - set(self.classes.get(column, ())):
                raise ValueError(f"label column {column!r} has values missing from its classes")
        if len(self.is_test) != n:
            raise ValueError(f"the split marks {len(self.is_test)} rows for {n} texts")

    @property
    def label_columns(self) -> tuple[str, ...]:
        return tuple(self.labels)

    @property
    def fingerprint(self) -> str:
        """A short hash of the texts, labels and split: the same data, the same hash."""
        digest = hashlib.sha1()
        for text in self.texts:
            digest.update(text.encode("utf-8") + b"\0")
        for column, values in self.labels.items():
            digest.update(json.dumps([column, list(values)]).encode("utf-8"))
        digest.update(bytes(self.is_test))
        return digest.hexdigest()[:12]

    @property
    def memo_key(self) -> tuple[str, str, str]:
        """The key of this dataset's activations in `EvalData`."""
        return ("probe_dataset", self.name, self.fingerprint)

    def indices(self, split: str, **where: str) -> np.ndarray:
        """Row indices of `split` ("train" / "test") whose labels equal `where`, in order."""
        if split not in ("train", "test"):
            raise ValueError(f"split is 'train' or 'test', not {split!r}")
        keep = np.array(self.is_test) == (split == "test")
        for column, value in where.items():
            keep &= np.array(self.labels[column]) == value
        return np.flatnonzero(keep)

    def binary_tasks(
        self,
        column: str | None = None,
        seed: int = 0,
        max_train: int | None = None,
        max_test: int | None = None,
    ) -> list[ProbeTask]:
        """The binary tasks of one label column (default: the first).

        A two-class column is one task, both classes the same size (the larger one cut
        down). A column of more classes gives one task per class, that class against a
        same-sized sample of the others, drawn equally from each other class (as SAEBench
        does). `max_train` / `max_test` cap the rows of each split of a task."""
        column = column or self.label_columns[0]
        if column not in self.labels:
            raise ValueError(
                f"{self.name} has no label column {column!r}; its columns are "
                f"{list(self.label_columns)}"
            )
        classes = self.classes[column]
        rng = np.random.default_rng(seed)
        if len(classes) == 2:
            pos, neg = classes
            pairs = [(f"{pos} / {neg}", pos, [neg])]
        else:
            pairs = [(c, c, [o for o in classes if o != c]) for c in classes]
        tasks = []
        for name, pos, negs in pairs:
            split_rows = {}
            for split, cap in (("train", max_train), ("test", max_test)):
                positives = self.indices(split, **{column: pos})
                pools = [self.indices(split, **{column: n}) for n in negs]
                split_rows[split] = _balanced(positives, pools, cap, rng)
            (tr_idx, tr_y), (te_idx, te_y) = split_rows["train"], split_rows["test"]
            tasks.append(ProbeTask(name, column, pos, tr_idx, tr_y, te_idx, te_y))
        return tasks


def _balanced(
    positives: np.ndarray, pools: list[np.ndarray], cap: int | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, labels) with as many negatives as positives, negatives drawn equally from each
    pool, shuffled."""
    n = len(positives)
    if len(pools) == 1:
        n = min(n, len(pools[0]))
    if cap is not None:
        n = min(n, cap // 2)
    pos = rng.permutation(positives)[:n]
    share = -(-n // len(pools))  # ceil: a pool short of its share leaves the rest to others
    negatives = np.concatenate([rng.permutation(p)[:share] for p in pools])
    neg = rng.permutation(negatives)[:n]
    n = min(len(pos), len(neg))
    rows = np.concatenate([pos[:n], neg[:n]])
    labels = np.concatenate([np.ones(n, np.int64), np.zeros(n, np.int64)])
    order = rng.permutation(len(rows))
    return rows[order], labels[order]


# Built-in datasets


def work_text(name: str, text: str) -> str:
    """The part of a bundled work that is its author's own text (see `WorkInfo`)."""
    info = WORKS[name]
    begin = 0
    if info.start is not None:
        at = text.find(info.start)
        if at < 0:
            raise RuntimeError(f"work {name!r}: start marker {info.start!r} not found")
        begin = at + len(info.start)
    elif info.genre in _PLAY_GENRES:
        match = _FIRST_ACT.search(text)
        begin = match.start() if match else 0
    end = len(text)
    if info.end is not None:
        at = text.find(info.end, begin)
        if at < 0:
            raise RuntimeError(f"work {name!r}: end marker {info.end!r} not found")
        end = at
    return text[begin:end]


def passages(text: str, max_chars: int = PASSAGE_CHARS, min_chars: int = MIN_PASSAGE_CHARS
             ) -> list[str]:
    """Consecutive runs of whole lines, each at most `max_chars` long (a longer line is cut),
    without the runs shorter than `min_chars` or with fewer letters than other characters
    (tables of contents, line-number columns)."""
    out: list[str] = []
    current: list[str] = []
    size = 0

    def flush() -> None:
        chunk = "\n".join(current).strip("\n")
        body = "".join(chunk.split())
        letters = sum(ch.isalpha() for ch in body)
        if len(chunk.strip()) >= min_chars and letters * 2 > len(body):
            out.append(chunk)

    for line in text.split("\n"):
        line = _MARGIN_NUMBER.sub("", line).strip()[:max_chars]
        if current and size + len(line) + 1 > max_chars:
            flush()
            current, size = [], 0
        if not current and not line.strip():
            continue  # a passage starts on a line with text
        current.append(line)
        size += len(line) + 1
    if current:
        flush()
    return out


@lru_cache(maxsize=1)
def _work_passages() -> dict[str, tuple[str, ...]]:
    from saekit.assets.corpus import load_works

    found = {}
    for name, text in load_works():
        if name not in WORKS:
            raise RuntimeError(f"work {name!r} of the corpus is missing from WORKS")
        found[name] = tuple(passages(work_text(name, text)))
    return found


def _period(year: int) -> str:
    return "early" if year < 1600 else "late"


def _form(genre: str) -> str:
    if genre in _PLAY_GENRES or genre == "masque":
        return "drama"
    return "poem" if genre == "poem" else "other"


def _work_labels(name: str) -> dict[str, str]:
    info = WORKS[name]
    return {
        "author": info.author,
        "genre": info.genre,
        "period": _period(info.year),
        "form": _form(info.genre),
    }


class _Builtin(NamedTuple):
    columns: tuple[str, ...]
    classes: tuple[tuple[str, ...], ...]
    #: (train, test) passages per combination of classes, or per class of one column.
    sizes: Mapping[tuple[str, ...], tuple[int, int]]
    description: str


def _uniform(columns: tuple[tuple[str, ...], ...], train: int, test: int
             ) -> dict[tuple[str, ...], tuple[int, int]]:
    from itertools import product

    return {combo: (train, test) for combo in product(*columns)}


_GENRE_PERIOD_CLASSES = (("comedy", "tragedy"), ("early", "late"))
#: SCR's biased set takes twice as many texts from the diagonal quadrants (comedy-early,
#: tragedy-late) as its balanced sets take from each quadrant.
_GENRE_PERIOD_SIZES = {
    ("comedy", "early"): (120, 60),
    ("tragedy", "late"): (120, 60),
    ("comedy", "late"): (60, 30),
    ("tragedy", "early"): (60, 30),
}

_AUTHOR_FORM_CLASSES = (("drama", "poem"), ("shakespeare", "milton"))
_AUTHOR_FORM_SIZES = {
    ("drama", "shakespeare"): (120, 60),
    ("poem", "milton"): (120, 60),
    ("drama", "milton"): (60, 30),
    ("poem", "shakespeare"): (60, 30),
}

BUILTIN: dict[str, _Builtin] = {
    "author": _Builtin(
        ("author",), (("shakespeare", "milton"),),
        _uniform((("shakespeare", "milton"),), 100, 50),
        "Shakespeare vs Milton passages",
    ),
    "genre": _Builtin(
        ("genre",), (("comedy", "tragedy"),),
        _uniform((("comedy", "tragedy"),), 100, 50),
        "Shakespeare comedy vs tragedy passages (First Folio categories)",
    ),
    "folio": _Builtin(
        ("genre",), (("comedy", "history", "tragedy"),),
        _uniform((("comedy", "history", "tragedy"),), 80, 40),
        "Shakespeare comedy, history and tragedy passages (one-vs-rest)",
    ),
    "genre_period": _Builtin(
        ("genre", "period"), _GENRE_PERIOD_CLASSES, _GENRE_PERIOD_SIZES,
        "Shakespeare comedy / tragedy x written before 1600 / from 1600 on (for SCR)",
    ),
    "author_form": _Builtin(
        ("form", "author"), _AUTHOR_FORM_CLASSES, _AUTHOR_FORM_SIZES,
        "drama / poem x Shakespeare / Milton (for SCR)",
    ),
}


def builtin_dataset(name: str) -> ProbeDataset:
    """A built-in dataset by name (see the module docstring); the same texts every time."""
    if name not in BUILTIN:
        raise ValueError(
            f"no built-in probe dataset {name!r}; the built-in ones are {', '.join(BUILTIN)}"
        )
    return _builtin_dataset(name)


@cache
def _builtin_dataset(name: str) -> ProbeDataset:
    spec = BUILTIN[name]
    works = _work_passages()
    texts: list[str] = []
    labels: dict[str, list[str]] = {c: [] for c in spec.columns}
    is_test: list[bool] = []
    for i, (combo, (n_train, n_test)) in enumerate(spec.sizes.items()):
        wanted = dict(zip(spec.columns, combo, strict=True))
        pool = [
            p
            for work, found in works.items()
            if WORKS[work].in_tasks and _matches(_work_labels(work), wanted)
            for p in found
        ]
        if len(pool) < n_train + n_test:
            raise RuntimeError(f"{name}: {combo} has {len(pool)} passages, fewer than needed")
        rng = np.random.default_rng([DATA_SEED, i])
        chosen = rng.choice(len(pool), n_train + n_test, replace=False)
        for j, at in enumerate(chosen):
            texts.append(pool[at])
            for column, value in wanted.items():
                labels[column].append(value)
            is_test.append(j >= n_train)
    return ProbeDataset(
        name=name,
        texts=tuple(texts),
        labels={c: tuple(v) for c, v in labels.items()},
        classes=dict(zip(spec.columns, spec.classes, strict=True)),
        is_test=tuple(is_test),
    )


def _matches(labels: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    return all(labels[c] == v for c, v in wanted.items())


# User datasets


def load_probe_dataset(
    source: Any,
    text_column: str | None = None,
    label_columns: str | Sequence[str] | None = None,
    *,
    name: str | None = None,
    test_fraction: float = 0.2,
    seed: int = DATA_SEED,
) -> ProbeDataset:
    """A `ProbeDataset` from labelled data.

    Args:
        source: a CSV or JSONL file, or anything `load_text_dataset` reads (a Hub dataset
            name, a local folder or file, a `datasets.Dataset`); its "train" split is read.
        text_column: the column of texts; default: the usual names ("text", "content", ...)
            or the only string column.
        label_columns: one or two label columns; default: the first of "label", "labels",
            "class", "category", "target". Labels are read as strings; a column of more than
            two classes gives one-vs-rest tasks.
        name: the dataset's name in results (default: the source as given).
        test_fraction: the share of each class (each pair of classes, with two columns)
            held out for testing.
        seed: the seed of the split.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie between 0 and 1, got {test_fraction}")
    where = _describe(source)
    rows, columns = _read_rows(source)
    if not rows:
        raise ValueError(f"{where} has no rows; pass a dataset with labelled texts")
    text_column = _text_column(rows, columns, text_column, where)
    label_cols = _label_columns(columns, label_columns, text_column, where)
    texts = []
    empty = []
    for i, row in enumerate(rows):
        text = row.get(text_column)
        text = "" if text is None else str(text)
        if not text.strip():
            empty.append(i)
        texts.append(text)
    if empty:
        raise ValueError(
            f"{where}: {len(empty)} rows have an empty {text_column!r} (first at row "
            f"{empty[0]}); remove those rows or fill in their text"
        )
    labels: dict[str, tuple[str, ...]] = {}
    classes: dict[str, tuple[str, ...]] = {}
    for column in label_cols:
        values = [_label(row.get(column)) for row in rows]
        missing = [i for i, v in enumerate(values) if v is None]
        if missing:
            raise ValueError(
                f"{where}: {len(missing)} rows have no {column!r} label (first at row "
                f"{missing[0]}); remove those rows or label them"
            )
        found = tuple(sorted(set(values)))  # type: ignore[arg-type]
        if len(found) < 2:
            raise ValueError(
                f"{where}: label column {column!r} has one class only ({found[0]!r}); a probe "
                "needs at least two classes"
            )
        for value in found:
            count = values.count(value)
            if count < MIN_ROWS_PER_CLASS:
                raise ValueError(
                    f"{where}: class {value!r} of label column {column!r} has {count} rows; each "
                    f"class needs at least {MIN_ROWS_PER_CLASS} (some to train the probe, some to "
                    "test it). Add rows or merge that class into another"
                )
        labels[column] = tuple(values)  # type: ignore[arg-type]
        classes[column] = found
    is_test = _split(labels, test_fraction, seed)
    return ProbeDataset(
        name=name or where,
        texts=tuple(texts),
        labels=labels,
        classes=classes,
        is_test=is_test,
    )


def _describe(source: Any) -> str:
    return str(source) if isinstance(source, (str, Path)) else type(source).__name__


def _label(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value != value:  # NaN: pandas' missing value
        return None
    text = str(value).strip()
    return text or None


def _read_rows(source: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows as dicts, column names)."""
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        suffix = path.suffix.lower()
        if path.is_file() and suffix in (".csv", ".jsonl"):
            text = _read_text(path)
            return _csv_rows(text, path) if suffix == ".csv" else _jsonl_rows(text, path)
    from saekit.data.text import column_names, load_text_dataset

    dataset = load_text_dataset(source)
    columns = column_names(dataset)
    if columns is None:
        raise ValueError(
            f"{_describe(source)} holds plain texts without labels; pass a dataset with a text "
            "column and a label column (CSV, JSONL or a datasets.Dataset)"
        )
    return [dict(row) for row in dataset], list(columns)


def _read_text(path: Path) -> str:
    """The file's text, read strictly as UTF-8 (a byte-order mark is dropped)."""
    from saekit.data.text import check_text_file
    from saekit.errors import SaekitError

    try:
        check_text_file(path)
    except SaekitError as err:
        raise ValueError(str(err)) from None
    return path.read_text(encoding="utf-8-sig")


def _csv_rows(text: str, path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = [c.strip() for c in reader.fieldnames or []]
    if not columns:
        raise ValueError(f"{path} has no header row; its first line must name the columns")
    rows = []
    for row in reader:
        if None in row:
            raise ValueError(
                f"{path}, line {reader.line_num}: more fields than the header's "
                f"{len(columns)}; quote fields that contain commas"
            )
        rows.append({k.strip(): v for k, v in row.items()})
    return rows, columns


def _jsonl_rows(text: str, path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    rows: list[dict[str, Any]] = []
    columns: dict[str, None] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}, line {number}: not JSON ({err.msg}); each line must be one JSON object"
            ) from None
        if not isinstance(row, dict):
            raise ValueError(
                f"{path}, line {number}: a {type(row).__name__}, not a JSON object; each line "
                'must be an object such as {"text": "...", "label": "..."}'
            )
        rows.append(row)
        columns.update(dict.fromkeys(row))
    return rows, list(columns)


def _text_column(rows: list[dict[str, Any]], columns: list[str], given: str | None,
                 where: str) -> str:
    from saekit.data.text import TEXT_COLUMNS

    if given is not None:
        if given not in columns:
            raise ValueError(
                f"{where} has no column {given!r}; its columns are {columns}. Name the text "
                "column with text_column="
            )
        return given
    for column in TEXT_COLUMNS:
        if column in columns:
            return column
    strings = [c for c in columns if isinstance(rows[0].get(c), str) and c not in LABEL_COLUMNS]
    if len(strings) == 1:
        return strings[0]
    raise ValueError(
        f"cannot tell which column of {where} holds the text; its columns are {columns}. "
        "Name it with text_column="
    )


def _label_columns(columns: list[str], given: str | Sequence[str] | None, text_column: str,
                   where: str) -> tuple[str, ...]:
    if given is None:
        for column in LABEL_COLUMNS:
            if column in columns:
                return (column,)
        raise ValueError(
            f"cannot tell which column of {where} holds the labels; its columns are {columns}. "
            "Name one or two with label_columns="
        )
    chosen = (given,) if isinstance(given, str) else tuple(given)
    if not 1 <= len(chosen) <= 2:
        raise ValueError(f"label_columns names one or two columns, not {len(chosen)}")
    for column in chosen:
        if column not in columns:
            raise ValueError(
                f"{where} has no column {column!r}; its columns are {columns}. Name the label "
                "columns with label_columns="
            )
        if column == text_column:
            raise ValueError(f"{column!r} is the text column; it cannot be a label column too")
    return chosen


def _split(labels: Mapping[str, tuple[str, ...]], test_fraction: float, seed: int
           ) -> tuple[bool, ...]:
    """A test mark per row: `test_fraction` of each combination of labels (at least one row
    of a group of two or more), chosen by `seed`."""
    keys = list(zip(*labels.values(), strict=True))
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    rng = np.random.default_rng(seed)
    is_test = [False] * len(keys)
    for key in sorted(groups):
        rows = groups[key]
        n_test = min(max(1, round(test_fraction * len(rows))), len(rows) - 1)
        for i in rng.permutation(rows)[:n_test]:
            is_test[int(i)] = True
    return tuple(is_test)


def resolve_probe_datasets(
    names_or_sources: Iterable[Any],
    text_column: str | None = None,
    label_columns: str | Sequence[str] | None = None,
) -> list[ProbeDataset]:
    """Each entry as a `ProbeDataset`: a built-in name, a `ProbeDataset` as it is, or a
    source for `load_probe_dataset` (which reads `text_column` / `label_columns`)."""
    out = []
    for entry in names_or_sources:
        if isinstance(entry, ProbeDataset):
            out.append(entry)
        elif isinstance(entry, str) and entry in BUILTIN and not Path(entry).exists():
            out.append(builtin_dataset(entry))
        else:
            out.append(load_probe_dataset(entry, text_column, label_columns))
    if not out:
        raise ValueError(
            f"no probe datasets given; name built-in ones ({', '.join(BUILTIN)}) or files"
        )
    return out
