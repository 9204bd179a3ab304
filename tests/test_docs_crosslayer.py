"""Every Python code block of docs/crosslayer.md runs, top to bottom, in one namespace."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from doc_pages import run_page


def test_docs_crosslayer_code_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_page("docs/crosslayer.md", min_blocks=5)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "torch.Size([3, 4, 256]) torch.Size([3, 4, 512])" in out
    assert "['W_dec_0', 'W_dec_1', 'W_dec_2', 'W_dec_3']" in out
    assert "blocks.0.ln2.hook_normalized blocks.3.hook_mlp_out" in out
    assert "(4, 256, 256) True True" in out  # the skip path starts at zero, adds to decode
    assert "True\nTrue\n(1, 7, 256)\nTrue\n" in out  # CE score > 0; spliced CLT's logits,
    # layer 2's latents and the spliced replacement model's logits
    assert "jumprelu blocks.2.ln2.hook_normalized" in out
    assert (tmp_path / "ct_clt" / "W_dec_3.safetensors").is_file()
    assert "['bundled', 'bundled-mlp1x3']" in out  # the crosscoder's two models
    assert "relative decoder norms of 128 latents (0: bundled only" in out  # the summary
    assert (tmp_path / "diff_dashboard" / "index.html").is_file()
