"""Every Python code block of docs/activations.md runs, top to bottom, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "activations.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_docs_activations_code_runs(capsys) -> None:
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 8
    namespace: dict[str, object] = {"__name__": "docs_activations"}
    for i, block in enumerate(blocks):
        code = compile(block, f"{DOC.name} block {i + 1}", "exec")
        exec(code, namespace)  # noqa: S102 - running our own docs is the point
    out = capsys.readouterr().out
    # What the blocks print is what the prose says they show.
    assert "'blocks.1.hook_resid_pre': (1, " in out
    assert "closest valid hook names: blocks.1.hook_resid_pre" in out
    assert "True 16" in out
    assert "torch.Size([32, 32]) 32" in out
    assert out.count("True") >= 4
