"""`saekit.train` / `saekit train --activations DIR`: training from an activation cache."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import saekit
from saekit.assets.corpus import train_texts
from saekit.cli import main
from saekit.data.cache import CacheError, write_activation_cache
from saekit.models import load_model
from saekit.models.tiny import tiny_hooked_transformer, tiny_tokenizer
from saekit.training import checkpoint as ckpt

TEXTS = [f"to be or not to be, that is the question number {i}. " * 12 for i in range(120)]
HOOK = "blocks.1.hook_resid_pre"
CACHE_TOKENS = 3072
BATCH = 256


def config(out: Path, cache: Path, **data: object) -> dict:
    return {
        "sae": {"architecture": "topk", "expansion_factor": 2, "k": 8},
        "data": {"context_size": 32, "eval_tokens": 256, "activations": str(cache), **data},
        "training": {"tokens": BATCH * 12, "batch_size": BATCH, "lr": 1e-3},
        "run": {"out": str(out), "progress": False, "log_every": 4, "checkpoint_every": 1024},
    }


@pytest.fixture(scope="module")
def model(tiny_tl_model: object) -> object:
    return tiny_tl_model


@pytest.fixture(scope="module")
def tokenizer(model: object) -> object:
    return model.tokenizer  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, model: object) -> Path:
    """One shard of CACHE_TOKENS rows at HOOK, context 32, written from `model`."""
    out = tmp_path_factory.mktemp("cache") / "acts"
    write_activation_cache(load_model(model), HOOK, TEXTS, out, CACHE_TOKENS, context_size=32)
    return out


def test_training_reads_the_cache_not_the_model(
    tmp_path: Path, tokenizer: object, cache: Path
) -> None:
    # Same architecture, name and tokenizer, but every weight zero: its activations at HOOK
    # are all zero, so a run that ran the model would have no norm to scale by.
    zeroed = tiny_hooked_transformer(tokenizer=tokenizer)
    with torch.no_grad():
        for param in zeroed.parameters():
            param.zero_()
    out = saekit.train(config(tmp_path / "run", cache), model=zeroed, dataset=TEXTS)
    loaded = saekit.SAE.load(out.run_dir)
    assert loaded.cfg.metadata.hook_name == HOOK and loaded.cfg.d_in == 32
    assert out.metrics["l0"] == pytest.approx(8.0)  # evaluated with the (zeroed) model
    # The cache has one shard, so the norm estimate read all of it, in whatever order:
    # s = sqrt(d_in) / mean row norm of the cache's rows.
    rows = load_file(cache / "shard_00000.safetensors")[HOOK].double()
    assert rows.shape == (CACHE_TOKENS, 32) and rows.norm(dim=-1).min() > 0
    expected = math.sqrt(32) / rows.norm(dim=-1).mean().item()
    state = json.loads((out.run_dir / "run_state.json").read_text())
    assert state["norm_scaling_factor"] == pytest.approx(expected, rel=1e-9)
    assert saekit.TrainConfig.load(out.run_dir / "run_config.yaml").data.activations == str(cache)


def test_resume_from_a_checkpoint_gives_the_uninterrupted_weights(
    tmp_path: Path, model: object, cache: Path
) -> None:
    first = saekit.train(config(tmp_path / "run", cache), model=model, dataset=TEXTS)
    reference = {k: v.clone() for k, v in first.sae.state_dict().items()}
    # Fake an interruption at 2048 tokens: drop the finished SAE and the final checkpoint.
    (first.run_dir / "cfg.json").unlink()
    kept = ckpt.list_checkpoints(first.run_dir)
    assert [p.name for p in kept] == [f"tokens_{2048:015d}", f"tokens_{3072:015d}"]
    shutil.rmtree(kept[-1])
    resumed = saekit.train(
        {"run": {"resume": str(first.run_dir), "progress": False}}, model=model, dataset=TEXTS
    )
    for name, tensor in reference.items():
        assert torch.equal(tensor, resumed.sae.state_dict()[name]), name


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"hook": "blocks.0.hook_resid_pre"}, "'blocks.0.hook_resid_pre'"),
        ({"context_size": 16}, "context_size: cache has 32, the run uses 16"),
        ({"prepend_bos": False}, "framed 'bos', the run's 'none'"),
    ],
)
def test_a_cache_for_another_run_is_refused_naming_the_difference(
    tmp_path: Path, model: object, cache: Path, data: dict, named: str
) -> None:
    with pytest.raises(CacheError, match="does not match this run") as err:
        saekit.train(config(tmp_path / "run", cache, **data), model=model, dataset=TEXTS)
    assert named in str(err.value) and str(cache) in str(err.value)
    assert not (tmp_path / "run").exists()


def test_a_cache_of_another_model_is_refused(tmp_path: Path, cache: Path) -> None:
    other = tiny_hooked_transformer(d_model=16, tokenizer=tiny_tokenizer(vocab_size=280))
    with pytest.raises(CacheError) as err:
        saekit.train(config(tmp_path / "run", cache), model=other, dataset=TEXTS)
    text = str(err.value)
    assert f"d_in of {HOOK}: cache has 32, the run uses 16" in text
    assert "tokenizer:" in text and "300 tokens" in text and "280 tokens" in text
    # By name: the bundled model is not the model the cache was written from.
    with pytest.raises(CacheError, match="model: cache has 'tiny-hooked', the run uses 'bundled'"):
        saekit.train(config(tmp_path / "run", cache))


def test_too_few_tokens_fails_before_training_naming_both_numbers(
    tmp_path: Path, model: object, cache: Path
) -> None:
    cfg = config(tmp_path / "run", cache)
    cfg["training"]["tokens"] = 4000
    with pytest.raises(CacheError) as err:
        saekit.train(cfg, model=model, dataset=TEXTS)
    text = str(err.value)
    assert "holds 3,072 tokens" in text and "4,000 tokens" in text
    assert "lower --tokens to at most 3,072" in text and "saekit cache --tokens 4096" in text
    assert not (tmp_path / "run").exists()


def test_a_missing_cache_says_how_to_write_one(tmp_path: Path, model: object) -> None:
    with pytest.raises(FileNotFoundError, match="saekit cache"):
        saekit.train(config(tmp_path / "run", tmp_path / "nothing"), model=model, dataset=TEXTS)


def test_torchrun_with_a_cache_is_refused(
    tmp_path: Path, model: object, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="--activations with torchrun is not supported yet"):
        saekit.train(config(tmp_path / "run", cache), model=model, dataset=TEXTS)


def test_cli_cache_of_the_bundled_model_trains_by_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # `saekit cache --model bundled` records "bundled", the name a run of the bundled model
    # has, so the two agree; the hook defaults to the cache's one hook.
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(train_texts()[:20]))
    acts = tmp_path / "acts"
    assert main([
        "cache", "--model", "bundled", "--hook", "blocks.2.hook_resid_pre", "--dataset",
        str(corpus), "--tokens", "1024", "--out", str(acts), "--context-size", "32",
    ]) == 0
    cfg = config(tmp_path / "run", acts)
    cfg["training"]["tokens"] = 1024
    with caplog.at_level(logging.WARNING, logger="saekit.training.run"):
        out = saekit.train(cfg)
    assert out.sae.cfg.metadata.hook_name == "blocks.2.hook_resid_pre"
    assert out.sae.cfg.metadata.model_name == "bundled"
    assert "pass --dataset" in caplog.text  # the evaluation reads another dataset


def test_activations_flag_is_documented_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--activations ACTIVATIONS A folder written by `saekit cache`" in help_text
    assert "instead of running the model" in help_text
