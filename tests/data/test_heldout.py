"""Held-out text: splits that exist, unknown ones named, and held-out documents that no
training batch ever contains."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import saekit
from saekit.data.heldout import (
    HELDOUT_STRIDE,
    choose_eval_text,
    heldout_rows,
    is_heldout_row,
    training_rows,
)
from saekit.data.text import UnknownSplitError, dataset_splits, heldout_split, load_text_dataset
from saekit.models import load_model

# Pre-tokenized documents whose ids say which document they come from: document i is
# FIRST_ID + i repeated, so any token seen in a batch names its document.
FIRST_ID = 300
N_DOCS = 1000
DOC_TOKENS = 24


def documents() -> list[dict[str, list[int]]]:
    return [{"input_ids": [FIRST_ID + i] * DOC_TOKENS} for i in range(N_DOCS)]


class RecordingBackend:
    """A real backend that also keeps every token batch it was asked for activations of."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seen: list[torch.Tensor] = []

    def activations(self, tokens: torch.Tensor, hooks: Any) -> dict[str, torch.Tensor]:
        self.seen.append(tokens.clone())
        return self.inner.activations(tokens, hooks)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_no_heldout_document_reaches_a_training_batch(tmp_path: Path) -> None:
    backend = RecordingBackend(load_model("bundled"))
    cfg = {
        "sae": {"architecture": "topk", "expansion_factor": 1, "k": 8},
        "data": {"context_size": 32, "eval_tokens": 1024},
        "training": {"tokens": 2048, "batch_size": 256},
        "run": {"out": str(tmp_path / "run"), "progress": False, "report": False},
    }
    out = saekit.train(cfg, model=backend, dataset=documents())
    n_heldout = out.heldout.heldout_documents
    heldout_ids = {FIRST_ID + i for i in range(N_DOCS) if is_heldout_row(i, n_heldout)}
    # The evaluation read whole held-out documents only, in order: 0, 10, 20, ...
    eval_ids = set(torch.cat([b.flatten() for b in out.heldout.batches]).tolist())
    assert eval_ids <= heldout_ids and FIRST_ID in eval_ids
    assert n_heldout * DOC_TOKENS >= 1024
    # The store runs the model on 32 sequences at a time, the evaluation on 8 (and the
    # store's probe of the hook width on one of 2 tokens).
    assert all(b.shape[0] == 8 for b in out.heldout.batches)
    trained = [w for batch in backend.seen if tuple(batch.shape) == (32, 32) for w in batch]
    assert len(trained) * 32 >= 2048  # the training stream itself was recorded
    trained_ids = set(torch.stack(trained).flatten().tolist())
    assert not trained_ids & heldout_ids
    # Later held-out candidates (past the ones needed) are ordinary training documents.
    assert FIRST_ID + HELDOUT_STRIDE * n_heldout in trained_ids or n_heldout * 10 >= N_DOCS
    metrics = json.loads((out.run_dir / "metrics.json").read_text())
    assert metrics["evaluated_on"]["held_out_documents"] == n_heldout
    assert metrics["evaluated_on"]["tokens"] == 1024
    assert json.loads((out.run_dir / "run_state.json").read_text())["heldout_documents"] == (
        n_heldout
    )


def test_heldout_and_training_rows_partition_every_kind_of_dataset() -> None:
    import datasets

    rows = [{"text": f"document {i}"} for i in range(35)]
    expected_heldout = [f"document {i}" for i in (0, 10, 20)]
    for data in (rows, datasets.Dataset.from_list(rows),
                 datasets.Dataset.from_list(rows).to_iterable_dataset(), iter(rows)):
        held = [r["text"] for r in heldout_rows(data, limit=3)]
        assert held == expected_heldout
    for data in (rows, datasets.Dataset.from_list(rows),
                 datasets.Dataset.from_list(rows).to_iterable_dataset()):
        kept = [r["text"] for r in training_rows(data, 3)]
        assert len(kept) == 32 and not set(kept) & set(expected_heldout)
        assert "document 30" in kept  # the fourth candidate was not needed


def write_lines(path: Path, n: int, word: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{word} line {i}\n" for i in range(n)))
    return path


def test_a_local_file_has_one_split_and_an_unknown_split_is_named(tmp_path: Path) -> None:
    notes = write_lines(tmp_path / "notes.txt", 5, "note")
    assert dataset_splits(notes) == ["train"] and heldout_split(notes) is None
    with pytest.raises(UnknownSplitError, match=r"no split 'test'; its splits are train"):
        load_text_dataset(notes, split="test")
    with pytest.raises(UnknownSplitError, match="no split 'made-up'"):
        load_text_dataset(notes, split="made-up")


def test_a_folder_with_a_test_file_keeps_it_out_of_train(tmp_path: Path) -> None:
    write_lines(tmp_path / "data" / "train.txt", 6, "train")
    write_lines(tmp_path / "data" / "test.txt", 4, "test")
    folder = tmp_path / "data"
    assert sorted(dataset_splits(folder)) == ["test", "train"]
    assert heldout_split(folder) == "test"
    train = [r["text"] for r in load_text_dataset(folder)]
    test = [r["text"] for r in load_text_dataset(folder, split="test")]
    assert all(t.startswith("train") for t in train) and len(train) == 6
    assert all(t.startswith("test") for t in test) and len(test) == 4
    with pytest.raises(UnknownSplitError, match="its splits are train, test|test, train"):
        load_text_dataset(folder, split="validation")


def test_choice_of_eval_text(tmp_path: Path) -> None:
    notes = write_lines(tmp_path / "notes.txt", 5, "note")
    other = write_lines(tmp_path / "other.txt", 5, "other")
    choice = choose_eval_text(str(notes))
    assert choice.from_training_data and choice.split == "train"
    assert choose_eval_text("bundled").split == "test"
    explicit = choose_eval_text(str(notes), eval_dataset=str(other))
    assert explicit.source == str(other) and not explicit.from_training_data
    # Naming the training file itself as eval text still holds documents out.
    assert choose_eval_text(str(notes), eval_dataset=str(notes)).from_training_data
    with pytest.raises(ValueError, match="the split the run trains on"):
        choose_eval_text("bundled", eval_split="train")
    with pytest.raises(UnknownSplitError, match="its splits are train"):
        choose_eval_text(str(notes), eval_split="test")


def test_run_on_a_local_file_reports_what_it_evaluated_on(tmp_path: Path, capsys: Any) -> None:
    from saekit.cli import main

    notes = tmp_path / "notes.txt"
    notes.write_text("".join(f"Note {i}: the tide rose over the wall.\n" for i in range(600)))
    code = main([
        "train", "--dataset", str(notes), "--tokens", "2048", "--batch-size", "256",
        "--context-size", "32", "--eval-tokens", "512", "--expansion-factor", "1",
        "--out", str(tmp_path / "run"), "--no-progress", "--no-report",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"held-out documents of {notes}" in printed
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["evaluated_on"]["dataset"] == str(notes)
    assert metrics["evaluated_on"]["held_out_documents"] > 0
    assert not (tmp_path / "run" / "dashboard").exists()  # --no-report


def test_evaluating_on_the_training_file_reads_the_documents_the_run_held_out(
    tmp_path: Path,
) -> None:
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in documents()))
    cfg = {
        "sae": {"architecture": "topk", "expansion_factor": 1, "k": 8},
        "data": {"dataset": str(data), "context_size": 32, "eval_tokens": 1024},
        "training": {"tokens": 2048, "batch_size": 256},
        "run": {"out": str(tmp_path / "run"), "progress": False, "report": False},
    }
    out = saekit.train(cfg, model=load_model("bundled"))
    n_heldout = out.sae.cfg.metadata.extra["heldout_documents"]
    assert n_heldout == out.heldout.heldout_documents > 0
    later = RecordingBackend(load_model("bundled"))
    saekit.evaluate(saekit.SAE.load(out.run_dir), later, dataset=str(data), tokens=512,
                    context_size=32, downstream=False)
    seen = set(torch.cat([t.flatten() for t in later.seen]).tolist())
    assert seen and seen <= {FIRST_ID + i for i in range(N_DOCS) if is_heldout_row(i, n_heldout)}


def test_eval_dataset_names_the_held_out_text(tmp_path: Path) -> None:
    from saekit.cli import main

    notes = write_lines(tmp_path / "notes.txt", 400, "the tide rose over the wall, note")
    other = write_lines(tmp_path / "other.txt", 400, "a gull cried over the sea, entry")
    code = main([
        "train", "--dataset", str(notes), "--eval-dataset", str(other), "--tokens", "1024",
        "--batch-size", "256", "--context-size", "32", "--eval-tokens", "256",
        "--expansion-factor", "1", "--out", str(tmp_path / "run"), "--no-progress",
        "--no-report",
    ])
    assert code == 0
    evaluated_on = json.loads((tmp_path / "run" / "metrics.json").read_text())["evaluated_on"]
    assert evaluated_on == {"dataset": str(other), "tokens": 256, "split": "train"}
    assert json.loads((tmp_path / "run" / "run_state.json").read_text())["heldout_documents"] == 0
