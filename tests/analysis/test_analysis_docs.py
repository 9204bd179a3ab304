"""The ```python blocks of docs/analysis.md run, in order, in one namespace."""

from __future__ import annotations

from pathlib import Path

import pytest
from doc_pages import run_page


def test_analysis_page_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace = run_page("docs/analysis.md", min_blocks=6)
    assert (tmp_path / "dashboard" / "index.html").is_file()
    assert not namespace["steered"].tokens.equal(namespace["plain"].tokens)
