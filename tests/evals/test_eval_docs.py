"""The ```python blocks of docs/evaluation.md run, in order, in one namespace."""

from __future__ import annotations

from pathlib import Path

import pytest
from doc_pages import run_page


def test_evaluation_page_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace = run_page("docs/evaluation.md", min_blocks=2)
    assert namespace["metrics"].to_dict()["l0"] == 8.0
