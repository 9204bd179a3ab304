"""Probing datasets: the built-in ones against the table of works, and user files."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from saekit.evals import probe_data
from saekit.evals.probe_data import (
    BUILTIN,
    WORKS,
    ProbeDataset,
    builtin_dataset,
    load_probe_dataset,
    passages,
    resolve_probe_datasets,
    work_text,
)


def _passage_owner() -> dict[str, set[str]]:
    owners: dict[str, set[str]] = {}
    for work, found in probe_data._work_passages().items():
        for p in found:
            owners.setdefault(p, set()).add(work)
    return owners


def test_every_corpus_work_is_in_the_table() -> None:
    from saekit.assets.corpus import work_names

    assert set(work_names()) == set(WORKS)


@pytest.mark.parametrize("name", list(BUILTIN))
def test_builtin_labels_come_from_the_table(name: str) -> None:
    ds = builtin_dataset(name)
    owners = _passage_owner()
    for i, text in enumerate(ds.texts):
        works = owners[text]  # every text is a passage of some work
        for column, values in ds.labels.items():
            expected = {probe_data._work_labels(w)[column] for w in works}
            assert values[i] in expected
        assert all(WORKS[w].in_tasks for w in works)


@pytest.mark.parametrize("name", list(BUILTIN))
def test_builtin_classes_are_balanced_and_splits_disjoint(name: str) -> None:
    ds = builtin_dataset(name)
    spec = BUILTIN[name]
    counts = Counter(zip(*ds.labels.values(), ds.is_test, strict=True))
    for combo, (n_train, n_test) in spec.sizes.items():
        assert counts[(*combo, False)] == n_train
        assert counts[(*combo, True)] == n_test
    train = {t for t, test in zip(ds.texts, ds.is_test, strict=True) if not test}
    test = {t for t, test in zip(ds.texts, ds.is_test, strict=True) if test}
    assert not train & test


def test_builtin_datasets_are_deterministic() -> None:
    before = builtin_dataset("genre").fingerprint
    probe_data._builtin_dataset.cache_clear()
    probe_data._work_passages.cache_clear()
    assert builtin_dataset("genre").fingerprint == before


def test_genre_labels_follow_the_first_folio() -> None:
    genre = {w: i.genre for w, i in WORKS.items()}
    assert genre["measure_for_measure"] == "comedy" and genre["hamlet"] == "tragedy"
    assert genre["tempest"] == "romance" and genre["henry_v"] == "history"
    ds = builtin_dataset("genre")
    assert set(ds.labels["genre"]) == {"comedy", "tragedy"}
    owners = _passage_owner()
    used = {w for t in ds.texts for w in owners[t]}
    assert not used & {"tempest", "winters_tale", "cymbeline", "pericles", "troilus_and_cressida"}


def test_work_text_skips_front_matter_and_notes() -> None:
    from saekit.assets.corpus import load_works

    works = dict(load_works())
    hamlet = work_text("hamlet", works["hamlet"])
    assert hamlet.lstrip().startswith("ACT I") and "PERSONS REPRESENTED" not in hamlet
    comus = work_text("comus", works["comus"])
    assert "INTRODUCTION" not in comus and "INDEX TO THE NOTES" not in comus
    assert "Before the starry threshold of Jove's court" in comus


def test_passages_cut_whole_lines() -> None:
    lines = [f"line number {i} of a long poem, told at length" for i in range(30)]
    text = "\n".join(lines[:10]) + "\n\n\n" + "\n".join(lines[10:])
    out = passages(text, max_chars=200, min_chars=50)
    assert all(len(p) <= 200 for p in out)
    kept = [line for p in out for line in p.split("\n") if line]
    assert kept == lines  # nothing lost, in order
    # Margin line numbers and indentation go; a short run and a table of numbers are dropped.
    verse = "    Coasting the Tyrrhene shore, as the winds listed,        50\n    And more"
    assert passages(verse, min_chars=10) == ["Coasting the Tyrrhene shore, as the winds listed,\n"
                                             "And more"]
    assert passages("short", min_chars=10) == []
    assert passages("12, 34, 56, 78, 90, 11, 12, 13, 14", min_chars=10) == []


def _toy(labels: list[str], test: list[bool]) -> ProbeDataset:
    return ProbeDataset(
        "toy", tuple(f"t{i}" for i in range(len(labels))), {"y": tuple(labels)},
        {"y": tuple(sorted(set(labels)))}, tuple(test),
    )


def test_two_class_task_is_balanced() -> None:
    labels = ["a"] * 10 + ["b"] * 6
    ds = _toy(labels, [i % 4 == 0 for i in range(16)])
    (task,) = ds.binary_tasks(seed=1)
    assert task.name == "a / b" and task.positive == "a"
    for idx, y in ((task.train_idx, task.train_y), (task.test_idx, task.test_y)):
        assert y.sum() * 2 == len(y)
        assert all((labels[i] == "a") == bool(v) for i, v in zip(idx, y, strict=True))
    assert not set(task.train_idx) & set(task.test_idx)


def test_multiclass_column_gives_one_vs_rest_tasks() -> None:
    labels = ["a"] * 12 + ["b"] * 12 + ["c"] * 12
    ds = _toy(labels, [False] * 36)
    tasks = ds.binary_tasks(seed=0)
    assert [t.name for t in tasks] == ["a", "b", "c"]
    for task in tasks:
        pos = [labels[i] for i, y in zip(task.train_idx, task.train_y, strict=True) if y]
        neg = [labels[i] for i, y in zip(task.train_idx, task.train_y, strict=True) if not y]
        assert pos == [task.positive] * 12 and len(neg) == 12
        assert Counter(neg) == {c: 6 for c in "abc" if c != task.positive}
    capped = ds.binary_tasks(seed=0, max_train=8)[0]
    assert len(capped.train_idx) == 8


# User datasets


def _rows(n: int, classes: tuple[str, ...] = ("pos", "neg")) -> list[dict[str, str]]:
    return [{"text": f"text number {i}", "label": classes[i % len(classes)]} for i in range(n)]


def test_csv_with_one_label_column(tmp_path) -> None:
    path = tmp_path / "d.csv"
    lines = ["text,label"] + [f'"{r["text"]}, quoted",{r["label"]}' for r in _rows(20)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    ds = load_probe_dataset(path)
    assert ds.label_columns == ("label",) and ds.classes["label"] == ("neg", "pos")
    assert ds.texts[0] == "text number 0, quoted" and len(ds.texts) == 20
    assert Counter(zip(ds.labels["label"], ds.is_test, strict=True)) == {
        ("pos", False): 8, ("pos", True): 2, ("neg", False): 8, ("neg", True): 2
    }
    assert load_probe_dataset(path).fingerprint == ds.fingerprint  # seeded split


def test_csv_with_a_byte_order_mark_and_two_label_columns(tmp_path) -> None:
    path = tmp_path / "d.csv"
    rows = [f"text {i},{'x' if i % 2 else 'y'},{'p' if i % 3 else 'q'}" for i in range(30)]
    path.write_text("\ufeffbody,a,b\n" + "\n".join(rows) + "\n", encoding="utf-8")
    ds = load_probe_dataset(path, text_column="body", label_columns=["a", "b"])
    assert ds.label_columns == ("a", "b") and ds.texts[1] == "text 1"
    assert ds.labels["a"][:2] == ("y", "x") and ds.labels["b"][:4] == ("q", "p", "p", "q")


def test_latin1_csv_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "latin.csv"
    body = "text,label\n" + "\n".join(f"caf\xe9 {i},{i % 2}" for i in range(10)) + "\n"
    path.write_bytes(body.encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8.*Re-encode"):
        load_probe_dataset(path)


def test_jsonl_with_multiclass_labels(tmp_path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [{"content": f"words {i}", "category": i % 3, "other": 1} for i in range(30)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    ds = load_probe_dataset(path)
    assert ds.classes["category"] == ("0", "1", "2") and ds.texts[0] == "words 0"
    assert [t.name for t in ds.binary_tasks()] == ["0", "1", "2"]


def test_in_memory_dataset_and_resolve(tmp_path) -> None:
    import datasets

    mem = datasets.Dataset.from_list(_rows(12))
    ds = load_probe_dataset(mem, name="mem")
    assert ds.name == "mem" and len(ds.texts) == 12
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _rows(12)), encoding="utf-8")
    found = resolve_probe_datasets(["author", str(path), ds])
    assert [d.name for d in found] == ["author", str(path), "mem"]


@pytest.mark.parametrize(
    ("rows", "kwargs", "message"),
    [
        (_rows(12), {"label_columns": "kind"}, "no column 'kind'.*label_columns="),
        (_rows(12), {"text_column": "body"}, "no column 'body'.*text_column="),
        (_rows(12, ("one",)), {}, "one class only"),
        (_rows(6), {}, "has 3 rows; each class needs at least 4"),
        ([*_rows(12), {"text": "  ", "label": "pos"}], {}, "1 rows have an empty 'text'"),
        ([*_rows(12), {"text": "no label", "label": ""}], {}, "1 rows have no 'label' label"),
        ([{"text": f"t{i}", "y": "a"} for i in range(8)], {}, "which column.*holds the labels"),
        (_rows(12), {"label_columns": ["label", "label", "text"]}, "one or two columns"),
    ],
)
def test_bad_user_data_says_what_to_do(tmp_path, rows, kwargs, message) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_probe_dataset(path, **kwargs)


def test_bad_json_line_names_the_line(tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: not JSON"):
        load_probe_dataset(path)


def test_unknown_builtin_lists_the_builtin_ones() -> None:
    with pytest.raises(ValueError, match="author, genre"):
        builtin_dataset("nope")


def test_indices_select_by_split_and_label() -> None:
    ds = _toy(["a", "b", "a", "b"], [False, False, True, True])
    assert np.array_equal(ds.indices("test", y="a"), [2])
    assert np.array_equal(ds.indices("train"), [0, 1])
