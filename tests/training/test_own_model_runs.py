"""`saekit train` on a model and text that are not the bundled ones: a tiny random Qwen2 (a
tokenizer without BOS) read from its folder, and a text file of notes. The run, its report,
resuming it, extending it and the settings a resume may not change."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import saekit
from saekit.analysis.stats_files import read_script
from saekit.cli import main
from saekit.models import load_model
from saekit.training import checkpoint as ckpt
from saekit.training.runlog import read_log

CHECKPOINT_EVERY = 512


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from models.families import build_family

    root = tmp_path_factory.mktemp("own")
    notes = root / "notes.txt"
    notes.write_text(
        "".join(f"Note {i}: the tide rose over the harbour wall at dawn.\n" for i in range(800))
    )
    return {"model": build_family("qwen2", root / "qwen2"), "notes": notes}


def train_args(own: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", str(own["model"]), "--dataset", str(own["notes"]),
        "--tokens", "2048", "--batch-size", "256", "--context-size", "32",
        "--eval-tokens", "512", "--expansion-factor", "2", "--out", str(out),
        "--checkpoint-every", str(CHECKPOINT_EVERY), "--no-progress", *extra,
    ]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return saekit.SAE.load(folder).state_dict()


def test_a_run_without_bos_follows_the_tokenizer_and_reports(
    own: dict[str, Path], tmp_path: Path, capsys: Any
) -> None:
    assert main(train_args(own, tmp_path / "run")) == 0
    printed = capsys.readouterr().out
    assert "five latents" in printed and "dashboard of every latent" in printed
    assert (tmp_path / "run" / "dashboard" / "index.html").is_file()
    meta = saekit.SAE.load(tmp_path / "run").cfg.metadata
    # Every page of the run's dashboard names the run, the model and the hook.
    site = read_script(tmp_path / "run" / "dashboard" / "data" / "site.js", "SAEKIT_SITE")
    assert (site["sae"], site["model"]) == (str(tmp_path / "run"), meta.model_name)
    assert site["hook"] == meta.hook_name
    # Qwen's tokenizer has no BOS and adds nothing: so does the run, and the SAE says so.
    assert meta.prepend_bos is False and meta.window_prepend_bos is False
    assert meta.model_name == str(own["model"].resolve())
    assert meta.dataset_path == str(own["notes"])


def test_resume_uses_the_saved_settings_and_can_extend_the_run(
    own: dict[str, Path], tmp_path: Path, capsys: Any
) -> None:
    run = tmp_path / "run"
    assert main(train_args(own, run)) == 0
    first = weights(run)
    capsys.readouterr()
    # Resuming a finished run from another directory, with no other flag: the report is
    # built from the run's own model (width 64), not the command line's defaults.
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert "five latents" in capsys.readouterr().out
    for name, tensor in weights(run).items():
        assert torch.equal(tensor, first[name]), name
    # More tokens extend the run from its final checkpoint.
    assert main(["train", "--resume", str(run), "--tokens", "3072", "--no-progress"]) == 0
    assert read_log(run)[-1]["tokens"] == 3072
    assert saekit.TrainConfig.load(run / "run_config.yaml").training.tokens == 2048
    assert not torch.equal(weights(run)["W_enc"], first["W_enc"])


def test_resume_refuses_settings_that_cannot_change(
    own: dict[str, Path], tmp_path: Path, capsys: Any
) -> None:
    run = tmp_path / "run"
    assert main(train_args(own, run, "--no-report")) == 0
    before = weights(run)
    capsys.readouterr()
    code = main(["train", "--resume", str(run), "--lr", "0.5", "--k", "16", "--tokens", "1024"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("saekit: error:") and "--lr 0.5" in err and "--k 16" in err
    assert "--tokens 1024" in err and "can only grow" in err
    for name, tensor in weights(run).items():  # nothing the user had is touched
        assert torch.equal(tensor, before[name]), name


def test_a_run_stopped_before_its_first_checkpoint_starts_again(
    own: dict[str, Path], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    assert main(train_args(own, run, "--no-report")) == 0
    reference = weights(run)
    # What a run killed before its first checkpoint leaves: its config and state only.
    for path in run.iterdir():
        if path.name not in ("run_config.yaml", "run_state.json"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert ckpt.latest_checkpoint(run) is None
    assert main(["train", "--resume", str(run), "--no-progress", "--no-report"]) == 0
    for name, tensor in weights(run).items():
        assert torch.equal(tensor, reference[name]), name
    assert json.loads((run / "metrics.json").read_text())["evaluated_on"]["tokens"] == 512


def test_an_sae_trained_on_one_backend_evaluates_the_same_on_the_other(tmp_path: Path) -> None:
    run = tmp_path / "run"
    code = main([
        "train", "--backend", "transformer_lens", "--hook", "blocks.1.hook_mlp_out",
        "--tokens", "2048", "--batch-size", "256", "--context-size", "32",
        "--eval-tokens", "512", "--expansion-factor", "1", "--out", str(run),
        "--no-progress", "--no-report",
    ])
    assert code == 0
    sae = saekit.SAE.load(run)
    assert sae.cfg.metadata.hook_name == "blocks.1.hook_mlp_out"
    texts = ["The king is dead; long live the king. " * 20] * 4
    on_tl = saekit.evaluate(sae, load_model("bundled", backend="transformer_lens"),
                            dataset=texts, tokens=256, context_size=32)
    on_hf = saekit.evaluate(sae, load_model("bundled", backend="hf"),
                            dataset=texts, tokens=256, context_size=32)
    assert on_hf.l0 == pytest.approx(on_tl.l0, rel=1e-3)
    assert on_hf.explained_variance == pytest.approx(on_tl.explained_variance, abs=1e-3)
    assert on_hf.ce_loss_score == pytest.approx(on_tl.ce_loss_score, abs=1e-3)
