"""The one-command demo: `saekit train` with no arguments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from saekit import SAE
from saekit.cli import build_parser, main
from saekit.commands.train import config_from_args
from saekit.models.bundled import BUNDLED_MODEL_DIR


def test_demo_config_is_the_documented_one() -> None:
    cfg = config_from_args(build_parser().parse_args(["train"]))
    assert (cfg.data.model, cfg.data.dataset) == ("bundled", "bundled")
    assert cfg.sae.architecture == "topk" and cfg.sae.expansion_factor == 16
    assert cfg.training.aux_k_coefficient > 0  # AuxK on
    assert cfg.data.eval_tokens >= 100_000
    assert (BUNDLED_MODEL_DIR / "model.safetensors").is_file()


@pytest.mark.slow
def test_demo_trains_a_good_sae(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["train", "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 50 <= metrics["l0"] <= 200
    assert metrics["explained_variance"] >= 0.95
    assert metrics["ce_loss_score"] >= 0.99
    assert SAE.load(out).cfg.d_sae == 16 * 256
    printed = capsys.readouterr().out
    assert "five latents" in printed and (out / "dashboard" / "index.html").is_file()
