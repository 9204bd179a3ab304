"""`saekit eval` on the bundled model: the metrics table, progress on stderr and quiet modes,
`--model-batch-size`, and the good-SAE guide shared by the report and docs/evaluation.md."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

from saekit import SAE, SAEMetadata
from saekit.cli import main
from saekit.commands.report import TARGETS

DOCS = Path(__file__).resolve().parents[2] / "docs" / "evaluation.md"


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    meta = SAEMetadata(model_name="bundled", hook_name="blocks.1.hook_resid_pre", context_size=32)
    folder = tmp_path_factory.mktemp("sae")
    SAE.create("topk", d_in=256, d_sae=512, k=16, metadata=meta).save(folder)
    return folder


def run_eval(sae_dir: Path, out: Path, *flags: str, before: tuple[str, ...] = ()) -> int:
    return main([*before, "eval", str(sae_dir), "--tokens", "256", "--out", str(out), *flags])


def test_eval_prints_the_metrics_table_and_shows_progress(
    sae_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_eval(sae_dir, tmp_path / "out", "--model-batch-size", "4") == 0
    captured = capsys.readouterr()
    assert f"{sae_dir}: held-out metrics on " in captured.out
    assert "good SAE" in captured.out
    for name, good, _ in TARGETS:
        assert re.search(rf"^  {name} +-?\d+\.\d{{4}} +{re.escape(good)} +(ok|--)$",
                         captured.out, re.MULTILINE), name
    assert re.search(r"loading model bundled: \d+\.\d s", captured.err)
    assert "evaluating: 100%" in captured.err and re.search(r"\d[\d.]*k?tok/s", captured.err)


@pytest.mark.parametrize(
    ("before", "after"),
    [((), ("--no-progress",)), (("-q",), ())],
)
def test_no_progress_and_quiet_leave_only_results(
    sae_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    before: tuple[str, ...],
    after: tuple[str, ...],
) -> None:
    assert run_eval(sae_dir, tmp_path / "out", "--no-downstream", *after, before=before) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "good SAE" in captured.out and "metrics.csv" in captured.out


def test_old_batch_size_flag_still_works_with_a_warning(
    sae_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        assert run_eval(sae_dir, tmp_path / "out", "--no-downstream", "--batch-size", "2",
                        before=("-q",)) == 0
    assert "--batch-size is deprecated here; use --model-batch-size" in caplog.text


def test_docs_give_the_good_values_the_report_uses() -> None:
    """docs/evaluation.md's metric table states, for each headline metric, the same good
    value as the table `saekit train` and `saekit eval` print."""
    rows = {
        m.group(1): m.group(2).strip()
        for m in re.finditer(r"^\| `(\w+)` \|.*\| ([^|]*) \|$", DOCS.read_text(), re.MULTILINE)
    }
    for name, good, _ in TARGETS:
        assert name in rows, f"docs/evaluation.md has no row for {name}"
        assert rows[name].startswith(good), f"{name}: docs say {rows[name]!r}, report {good!r}"
