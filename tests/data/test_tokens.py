"""Text loading, column detection, packing and resuming (local files and in-memory data)."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from saekit.data.text import find_column, load_text_dataset
from saekit.data.tokens import TokenWindows, keep_mask, special_token_ids
from saekit.models.tiny import TINY_TEXTS, tiny_tokenizer

DOCS = list(TINY_TEXTS) * 3


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(300)


def expected_packed(tok, docs: list[str], ctx: int) -> list[list[int]]:
    """Packing by hand: BOS, then ctx-1 tokens of the EOS-separated document stream."""
    stream: list[int] = []
    for doc in docs:
        stream += tok.encode(doc, add_special_tokens=False) + [tok.eos_token_id]
    body = ctx - 1
    starts = range(0, len(stream) - body + 1, body)
    return [[tok.bos_token_id] + stream[i : i + body] for i in starts]


def windows(source, tok, ctx: int = 16, **kwargs) -> list[list[int]]:
    return [w.tolist() for w in TokenWindows(source, tok, ctx, **kwargs)]


def test_packing_matches_hand_packing(tok) -> None:
    got = windows(DOCS, tok, 16)
    assert got == expected_packed(tok, DOCS, 16)
    assert len(got) > 5


def test_packing_without_bos_or_separator(tok) -> None:
    got = windows(DOCS, tok, 12, prepend_bos=False, separator_token_id=None)
    stream = [t for d in DOCS for t in tok.encode(d, add_special_tokens=False)]
    assert got == [stream[i : i + 12] for i in range(0, len(stream) - 11, 12)]


def test_one_document_per_window(tok) -> None:
    got = windows(DOCS[:3], tok, 10, packing=False)
    for window, doc in zip(got, DOCS[:3], strict=True):
        ids = ([tok.bos_token_id] + tok.encode(doc, add_special_tokens=False))[:10]
        assert window == ids + [tok.pad_token_id] * (10 - len(ids))
    short = windows(["To be"], tok, 10, packing=False)[0]
    assert short.count(tok.pad_token_id) == 10 - 1 - len(tok.encode("To be"))


@pytest.mark.parametrize("kind", ["txt", "jsonl", "json", "csv", "parquet", "disk", "folder"])
def test_local_formats_give_the_same_windows(tmp_path, tok, kind: str) -> None:
    if kind == "txt":
        path = tmp_path / "docs.txt"
        path.write_text("\n".join(DOCS) + "\n")
    elif kind == "jsonl":
        path = tmp_path / "docs.jsonl"
        lines = [json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)]
        path.write_text("".join(lines))
    elif kind == "json":
        path = tmp_path / "docs.json"
        path.write_text(json.dumps([{"content": d} for d in DOCS]))
    elif kind == "csv":
        path = tmp_path / "docs.csv"
        datasets.Dataset.from_dict({"n": list(range(len(DOCS))), "body": DOCS}).to_csv(path)
    elif kind == "parquet":
        path = tmp_path / "docs.parquet"
        datasets.Dataset.from_dict({"text": DOCS}).to_parquet(path)
    elif kind == "disk":
        path = tmp_path / "saved"
        datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(path)
    else:
        path = tmp_path / "shards"
        path.mkdir()
        (path / "a.txt").write_text("\n".join(DOCS[:9]) + "\n")
        (path / "b.txt").write_text("\n".join(DOCS[9:]) + "\n")
    assert windows(path, tok) == expected_packed(tok, DOCS, 16)
    assert windows(str(path), tok) == expected_packed(tok, DOCS, 16)


def test_in_memory_sources(tok) -> None:
    expected = expected_packed(tok, DOCS, 16)
    assert windows(datasets.Dataset.from_dict({"text": DOCS}), tok) == expected
    assert windows(datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS})}),
                   tok) == expected
    iterable = datasets.IterableDataset.from_generator(lambda: ({"text": d} for d in DOCS))
    assert windows(iterable, tok) == expected
    assert windows(({"story": d} for d in DOCS), tok) == expected
    assert windows(iter(DOCS), tok) == expected


def test_text_column_detection_and_errors(tok) -> None:
    data = datasets.Dataset.from_dict({"title": ["a"] * 3, "n": [1, 2, 3], "words": DOCS[:3]})
    with pytest.raises(ValueError, match=r"columns are \['title', 'n', 'words'\]"):
        find_column(data)
    assert find_column(data, "words") == ("words", False)
    with pytest.raises(ValueError, match="no column 'txt'"):
        TokenWindows(data, tok, 8, text_column="txt")
    assert find_column(datasets.Dataset.from_dict({"n": [1], "only": ["x"]})) == ("only", False)
    with pytest.raises(ValueError, match="holds int values, not text"):
        list(TokenWindows(data, tok, 8, text_column="n"))


def test_missing_path_and_bad_suffix(tmp_path, tok) -> None:
    with pytest.raises(FileNotFoundError, match="no such dataset file or folder: .*nope.txt"):
        load_text_dataset(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="no such dataset file"):
        load_text_dataset("nope.txt")  # a file name is never looked up on the Hub
    bad = tmp_path / "data.xml"
    bad.write_text("<a/>")
    with pytest.raises(ValueError, match="suffix '.xml'"):
        load_text_dataset(bad)
    with pytest.raises(ValueError, match="holds no dataset"):
        load_text_dataset(tmp_path)


def test_pretokenized_rows_are_used_as_they_are(tok) -> None:
    rows = [list(range(i, i + 8)) for i in range(0, 40, 8)]
    data = datasets.Dataset.from_dict({"input_ids": rows})
    assert windows(data, tok, 8) == rows
    assert windows(data, tok, 16) == [rows[0] + rows[1], rows[2] + rows[3]]
    assert windows(data, None, 8, vocab_size=300) == rows


def test_pretokenized_vocabulary_is_checked(tok) -> None:
    data = datasets.Dataset.from_dict({"tokens": [[1, 2, 3, 299], [4, 5, 300, 6]]})
    with pytest.raises(ValueError, match="token id 300, outside the model's vocabulary of 300"):
        list(TokenWindows(data, tok, 4))


def test_text_needs_a_tokenizer() -> None:
    with pytest.raises(ValueError, match="a tokenizer is needed"):
        TokenWindows(DOCS, None, 8)


@pytest.mark.parametrize("packing", [True, False])
def test_resume_from_state_dict(tok, packing: bool) -> None:
    make = lambda: TokenWindows(  # noqa: E731
        datasets.Dataset.from_dict({"text": DOCS}), tok, 12, packing=packing, tokenize_batch=4
    )
    full = [w.tolist() for w in make()]
    first = make()
    head = [next(first).tolist() for _ in range(5)]
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    assert head + [w.tolist() for w in resumed] == full
    assert resumed.windows_emitted == len(full)


def test_resume_iterable_dataset(tok) -> None:
    def make() -> TokenWindows:
        gen = datasets.IterableDataset.from_generator(lambda: ({"text": d} for d in DOCS))
        return TokenWindows(gen, tok, 12, tokenize_batch=3)

    full = [w.tolist() for w in make()]
    first = make()
    head = [next(first).tolist() for _ in range(4)]
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert head + [w.tolist() for w in resumed] == full


def test_special_tokens_and_mask(tok) -> None:
    ids = special_token_ids(tok)
    assert {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id} <= ids
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    tokens = torch.tensor([[bos, 50, 60, eos], [70, pad, 80, 90]])
    expected = torch.tensor([[False, True, True, False], [True, False, True, True]])
    assert torch.equal(keep_mask(tokens, ids), expected)
    assert keep_mask(tokens, set()).all()
