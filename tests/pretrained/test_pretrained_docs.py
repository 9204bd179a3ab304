"""docs/pretrained.md's Python examples run as users would: loading examples offline from a
Hub cache, the sharing example against a stand-in Hub endpoint (HF_ENDPOINT)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import doc_pages
import pytest
import torch

from saekit import SAE, SAEConfig

DOC = Path(__file__).resolve().parents[2] / "docs" / "pretrained.md"
HOOK = "blocks.8.hook_resid_pre"


def python_blocks() -> list[str]:
    return doc_pages.python_blocks("docs/pretrained.md")


def run(code: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", code], env=full_env, cwd=cwd, capture_output=True, text=True
    )


@pytest.mark.slow
def test_doc_examples_run(tmp_path, hub_cache, fake_hub) -> None:
    blocks = python_blocks()
    assert len(blocks) >= 4
    cfg = SAEConfig("standard", d_in=768, d_sae=64, metadata={"model_name": "gpt2-small"})
    folder = SAE.from_config(cfg).save(tmp_path / "sae", sparsity=torch.full((64,), -3.0))
    hub_cache.add_folder("jbloom/GPT2-Small-SAEs-Reformatted", folder, HOOK)
    offline = [b for b in blocks if "push_to_hub" not in b]
    online = [b for b in blocks if "push_to_hub" in b]
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache.dir)}
    result = run("\n".join(offline), env, tmp_path)
    assert result.returncode == 0, result.stderr
    env = {"HF_ENDPOINT": fake_hub.url, "HF_TOKEN": "hf_doc_test_token", "HF_HUB_OFFLINE": "0"}
    result = run("\n".join(online), env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "my-name/my-saes" in fake_hub.repos
