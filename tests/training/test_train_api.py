"""`saekit.train` and `saekit train` on a tiny random TransformerLens model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import saekit
from saekit.cli import build_parser, main
from saekit.commands.train import config_from_args
from saekit.models.tiny import tiny_hooked_transformer, tiny_tokenizer
from saekit.training import ConfigError, TrainConfig
from saekit.training.config import SECTIONS
from saekit.training.fields import field_docs
from saekit.training.runlog import read_log

TEXTS = [f"to be or not to be, that is the question number {i}. " * 12 for i in range(120)]


def config(out: Path, **training: object) -> dict:
    return {
        "sae": {"architecture": "topk", "expansion_factor": 2, "k": 8},
        "data": {"context_size": 32, "eval_tokens": 256},
        "training": {"tokens": 256 * 12, "batch_size": 256, "lr": 1e-3, **training},
        "run": {"out": str(out), "progress": False, "log_every": 4, "checkpoint_every": 1024},
    }


@pytest.fixture(scope="module")
def model() -> object:
    return tiny_hooked_transformer(tokenizer=tiny_tokenizer())


def test_run_folder_is_a_loadable_sae_with_metrics_log_and_config(
    tmp_path: Path, model: object
) -> None:
    out = saekit.train(config(tmp_path / "run"), model=model, dataset=TEXTS)
    run = out.run_dir
    loaded = saekit.SAE.load(run)
    assert loaded.cfg.metadata.hook_name == "blocks.1.hook_resid_pre"  # middle of 2 layers
    assert loaded.cfg.d_sae == 2 * loaded.cfg.d_in and loaded.cfg.k == 8
    for name, tensor in out.sae.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics == out.metrics
    assert metrics["l0"] == pytest.approx(8.0)
    assert {"explained_variance", "ce_loss_score", "kl_div_score", "dead_fraction"} <= set(metrics)
    records = read_log(run)
    assert [r["step"] for r in records] == [4, 8, 12]
    assert (run / "sparsity.safetensors").is_file()
    assert (run / "checkpoints").is_dir()
    saved = TrainConfig.load(run / "run_config.yaml")
    assert saved.training.tokens == 256 * 12 and saved.run.out == str(tmp_path / "run")


def test_existing_folder_refused_then_overwrite_and_resume(tmp_path: Path, model: object) -> None:
    cfg = config(tmp_path / "run")
    first = saekit.train(cfg, model=model, dataset=TEXTS)
    with pytest.raises(FileExistsError, match="--resume .* --overwrite"):
        saekit.train(cfg, model=model, dataset=TEXTS)
    cfg["run"]["overwrite"] = True
    again = saekit.train(cfg, model=model, dataset=TEXTS)
    # Same seed, same data: the same SAE.
    for name, tensor in first.sae.state_dict().items():
        assert torch.equal(tensor, again.sae.state_dict()[name])
    resume = {"run": {"resume": str(tmp_path / "run"), "progress": False}}
    resumed = saekit.train(resume, model=model, dataset=TEXTS)
    assert resumed.metrics["l0"] == pytest.approx(8.0)


def test_invalid_config_lists_every_problem_at_once() -> None:
    bad = {
        "sae": {"architecture": "nope", "expansion_factor": 0},
        "training": {"lr": -1, "lr_schedule": "wavy", "tokens": "many",
                     "dead_pre_act_coefficient": -0.1},
        "run": {"dtype": "float8", "resum": "x"},
        "extra": {},
    }
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict(bad)
    text = str(err.value)
    for expected in ("architecture 'nope'", "expansion_factor", "lr must be positive",
                     "'wavy'", "training.tokens: expected int", "dtype 'float8'",
                     "unknown field 'resum' (did you mean 'resume'?)", "unknown section 'extra'",
                     "dead_pre_act_coefficient must be >= 0, got -0.1"):
        assert expected in text, expected
    assert len(err.value.problems) == 9


def test_every_field_has_a_flag_documented_by_its_docstring(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for cls in SECTIONS.values():
        docs = field_docs(cls)
        for name in cls.__dataclass_fields__:
            assert "--" + name.replace("_", "-") in help_text, name
            assert docs[name][:40] in help_text, name


def test_flags_override_the_config_file(tmp_path: Path) -> None:
    from saekit.cli import build_parser

    file = tmp_path / "c.yaml"
    file.write_text(yaml.safe_dump({"training": {"lr": 0.01, "tokens": 5000}}))
    args = build_parser().parse_args(
        ["train", "--config", str(file), "--lr", "0.002", "--target-l0", "64",
         "--architecture", "jumprelu", "--no-normalize-activations"]
    )
    cfg = config_from_args(args)
    assert cfg.training.lr == 0.002 and cfg.training.tokens == 5000
    assert cfg.training.target_l0 == 64 and cfg.sae.architecture == "jumprelu"
    assert cfg.sae.norm_scaling is False  # its old name still reads


def test_cli_reports_config_problems_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["train", "--lr", "-3", "--architecture", "nope", "--out", str(tmp_path / "r")])
    assert code == 2
    err = capsys.readouterr().err
    assert "lr must be positive" in err and "architecture 'nope'" in err
    assert not (tmp_path / "r").exists()


def test_a_missed_target_l0_is_reported(
    tmp_path: Path, model: object, caplog: pytest.LogCaptureFixture
) -> None:
    """Twelve steps cannot take a standard SAE from ~half its latents active to 1: the run
    finishes and says the target was missed and what to change."""
    cfg = config(tmp_path / "run", target_l0=1)
    cfg["sae"] = {"architecture": "standard", "expansion_factor": 2}
    with caplog.at_level("WARNING", logger="saekit.training.run"):
        out = saekit.train(cfg, model=model, dataset=TEXTS)
    assert out.metrics["l0"] > 1.1
    assert "not within 10% of target_l0=1 after 12 steps" in caplog.text
    assert "smaller batch_size" in caplog.text


def test_settings_answer_to_their_old_and_saelens_names(tmp_path: Path) -> None:
    from saekit.commands.train import given_settings

    args = build_parser().parse_args([
        "train", "--hook", "blocks.0.hook_resid_pre", "--training-tokens", "2048",
        "--train-batch-size-tokens", "512", "--d-sae", "96", "--l1-coefficient", "3",
        "--context-size", "64",
    ])
    cfg = config_from_args(args)
    assert cfg.data.hook_name == "blocks.0.hook_resid_pre"
    assert (cfg.training.tokens, cfg.training.batch_size) == (2048, 512)
    training = cfg.training
    assert (cfg.sae.d_sae, training.sparsity_coefficient, cfg.data.context_size) == (96, 3.0, 64)
    assert {"training.tokens", "data.hook_name"} <= given_settings(args)
    # The same in a config file, as saekit wrote it before and as SAELens names it.
    old = TrainConfig.from_dict({"data": {"hook": "x", "hook_out": "y"},
                                 "training": {"training_tokens": 4096}})
    assert (old.data.hook_name, old.data.hook_name_out, old.training.tokens) == ("x", "y", 4096)
    with pytest.raises(ConfigError, match="'hook' and 'hook_name' name the same setting"):
        TrainConfig.from_dict({"data": {"hook": "x", "hook_name": "y"}})
