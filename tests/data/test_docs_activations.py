"""Every Python code block of docs/activations.md runs, top to bottom, in one namespace."""

from __future__ import annotations

from doc_pages import run_page


def test_docs_activations_code_runs(capsys) -> None:
    run_page("docs/activations.md", min_blocks=8)
    out = capsys.readouterr().out
    # What the blocks print is what the prose says they show.
    assert "'blocks.1.hook_resid_pre': (1, " in out
    assert "closest valid hook names: blocks.1.hook_resid_pre" in out
    assert "True 16" in out
    assert "torch.Size([32, 32]) 32" in out
    assert out.count("True") >= 4
