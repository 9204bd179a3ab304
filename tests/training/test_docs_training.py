"""Every Python code block of docs/training.md runs, top to bottom, in one namespace."""

from __future__ import annotations

from pathlib import Path

import pytest
from doc_pages import run_page


def test_docs_training_code_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    run_page("docs/training.md", min_blocks=8)
    out = capsys.readouterr().out
    assert "2 32" in out  # two layers, width 32
    assert "lr must be positive" in out and "'wavy'" in out
    assert "runs/tutorial 8 blocks.1.hook_resid_pre" in out
    assert "'cfg.json', 'checkpoints', 'log.jsonl', 'metrics.json'" in out
    assert "L0 8.0" in out
    assert "from the cache: blocks.1.hook_resid_pre 8.0" in out
    assert "['jumprelu', 'topk']" in out
    assert (tmp_path / "runs" / "tutorial" / "cfg.json").is_file()
