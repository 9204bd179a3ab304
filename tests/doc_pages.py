"""Run the ```python blocks of a docs page (or the README), in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(page: str) -> list[str]:
    """The Python blocks of `page`, a path relative to the repository root."""
    return _BLOCK.findall((ROOT / page).read_text())


def run_page(page: str, min_blocks: int = 1) -> dict:
    """Execute every Python block of `page` top to bottom; returns the shared namespace."""
    blocks = python_blocks(page)
    assert len(blocks) >= min_blocks, f"{page} should show at least {min_blocks} examples"
    namespace: dict = {"__name__": "docs_" + Path(page).stem}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{page} block {i + 1}", "exec"), namespace)  # noqa: S102
    return namespace
