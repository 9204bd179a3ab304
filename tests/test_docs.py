"""Every ```python block in the README runs, in order, in a scratch folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from doc_pages import run_page

ROOT = Path(__file__).resolve().parent.parent


def test_readme_quick_start_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run_page("README.md")


def test_readme_first_two_blocks_are_the_setup_commands() -> None:
    fenced = re.findall(r"```\w*\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    install_and_run, install_and_test = (block.strip() for block in fenced[:2])
    assert "\n" not in install_and_run and "\n" not in install_and_test
    assert install_and_run.endswith("saekit train")
    assert "pytest" in install_and_test


def test_readme_lists_every_registered_architecture() -> None:
    import saekit

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Architectures"):text.index("## The folder format")]
    named = set(re.findall(r"`(\w+)`", section.split("Add your own")[0]))
    # saekit's own (other tests register their own architectures in the same process)
    built_in = {
        name for name in saekit.list_architectures()
        if saekit.architecture_class(name).__module__.startswith("saekit.")
    }
    assert built_in <= named
