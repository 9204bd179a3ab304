"""The bundled Shakespeare + Milton corpus and its deterministic train / held-out split.

The corpus ships as package data (``saekit/assets/corpus/``) so that the demo model, its
tokenizer and the examples work offline. The split is by whole works: a work is either entirely
in the training split or entirely held out, so held-out text is never seen during training, not
even as a neighbouring passage of the same play.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources
from pathlib import Path

__all__ = [
    "CORPUS_DIR",
    "HELDOUT_WORKS",
    "WORK_SEPARATOR",
    "heldout_text",
    "heldout_texts",
    "heldout_works",
    "load_works",
    "train_texts",
    "train_works",
    "work_names",
]

CORPUS_DIR: Path = Path(str(resources.files("saekit.assets").joinpath("corpus")))
_CORPUS_FILE = "shakespeare_milton.txt.gz"
_INDEX_FILE = "works.txt"

# Works are separated by a line that holds a single form feed.
WORK_SEPARATOR = "\n\f\n"

# Held-out works, chosen once by hand and fixed here so the split never changes: a tragedy, a
# comedy, a narrative poem of Shakespeare's and a long poem of Milton's, so the held-out set
# covers both authors and both verse and dialogue. Together they are about 5.0% of the
# characters of the corpus (326,142 of 6,460,374).
HELDOUT_WORKS: tuple[str, ...] = (
    "macbeth",
    "twelfth_night",
    "lovers_complaint",
    "paradise_regained",
)


def _work_name(file_name: str) -> str:
    # "paradise_lost_(no_introduction)_gut.txt" -> "paradise_lost_(no_introduction)"
    return file_name.removesuffix(".txt").removesuffix("_gut")


@lru_cache(maxsize=1)
def _index() -> tuple[tuple[str, int], ...]:
    lines = (CORPUS_DIR / _INDEX_FILE).read_text(encoding="utf-8").splitlines()
    rows = []
    for line in lines:
        if not line.strip():
            continue
        file_name, length = line.split("\t")
        rows.append((_work_name(file_name), int(length)))
    return tuple(rows)


def work_names() -> list[str]:
    """Names of all works in corpus order (file names without the ``_gut.txt`` suffix)."""
    return [name for name, _ in _index()]


@lru_cache(maxsize=1)
def _load_works_cached() -> tuple[tuple[str, str], ...]:
    with gzip.open(CORPUS_DIR / _CORPUS_FILE, "rt", encoding="utf-8") as f:
        raw = f.read()
    # The file ends with a newline after the last work, as every work ends before a separator.
    texts = raw.removesuffix("\n").split(WORK_SEPARATOR)
    index = _index()
    if len(texts) != len(index):
        raise RuntimeError(f"corpus holds {len(texts)} works but {_INDEX_FILE} lists {len(index)}")
    for (name, length), text in zip(index, texts, strict=True):
        # A length mismatch would mean a separator inside a work, i.e. a wrong split.
        if len(text) != length:
            raise RuntimeError(f"work {name!r}: {len(text)} characters, index says {length}")
    return tuple((name, text) for (name, _), text in zip(index, texts, strict=True))


def load_works() -> list[tuple[str, str]]:
    """All works as ``(name, text)`` pairs, in corpus order."""
    return list(_load_works_cached())


def train_works() -> list[tuple[str, str]]:
    """``(name, text)`` pairs of the training split (every work not in ``HELDOUT_WORKS``)."""
    held = set(HELDOUT_WORKS)
    return [(n, t) for n, t in _load_works_cached() if n not in held]


def heldout_works() -> list[tuple[str, str]]:
    """``(name, text)`` pairs of the held-out split, in corpus order."""
    held = set(HELDOUT_WORKS)
    return [(n, t) for n, t in _load_works_cached() if n in held]


def train_texts() -> list[str]:
    """Texts of the training split, one string per work."""
    return [t for _, t in train_works()]


def heldout_texts() -> list[str]:
    """Texts of the held-out split, one string per work."""
    return [t for _, t in heldout_works()]


def heldout_text(n_chars: int | None = None) -> str:
    """A single held-out string (the first held-out work, optionally truncated): handy for demos.

    Truncation snaps back to the last line break so the snippet ends on a whole line.
    """
    text = heldout_texts()[0]
    if n_chars is None or n_chars >= len(text):
        return text
    cut = text.rfind("\n", 0, n_chars)
    return text[: cut if cut > 0 else n_chars]
