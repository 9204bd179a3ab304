"""docs/coming-from-saelens.md: its saekit examples run, in order, in one namespace, offline
on the bundled model (uploads go to a stand-in Hub, given as HF_ENDPOINT, which
huggingface_hub reads once at import: hence a fresh interpreter); and its table of runner
config fields covers every field the translator knows."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from doc_pages import ROOT, python_blocks
from pretrained.fake_hub_server import FakeHub

from saekit.training.saelens_config import FIXED, IGNORED, RULES, STEP_COUNTS, TRANSLATED

PAGE = "docs/coming-from-saelens.md"


def test_page_examples_run(tmp_path: Path) -> None:
    assert len(python_blocks(PAGE)) >= 10
    code = f"import doc_pages; doc_pages.run_page({PAGE!r}, min_blocks=10)"
    with FakeHub() as hub:
        env = {
            **os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_doc_test_token",
            "HF_HUB_OFFLINE": "0", "OMP_NUM_THREADS": "1",  # tiny matmuls: one thread
            "PYTHONPATH": str(ROOT / "tests"),
        }
        result = subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        assert "my-name/my-saes" in hub.repos
    assert "gpt2-small/8-res-jb" in result.stdout
    assert (tmp_path / "saes" / "blocks.2.hook_resid_pre" / "cfg.json").is_file()


def test_page_says_how_every_runner_field_translates() -> None:
    text = (ROOT / PAGE).read_text()
    named = set(re.findall(r"`(?:logger\.|sae\.)?(\w+)`", text))
    known = {*TRANSLATED, *STEP_COUNTS, *FIXED, *IGNORED, *RULES} - {"logger"}
    assert not known - named, sorted(known - named)
