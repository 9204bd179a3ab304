"""Progress on stderr for every long step, one switch that silences it, and no library noise.

Small real inputs on the bundled model: each step must draw a bar with its unit and rate
when progress is on, and nothing when it is off.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

import saekit
from saekit import SAE, SAEMetadata
from saekit.analysis import feature_statistics
from saekit.analysis.dashboard import write_dashboard
from saekit.cli import build_parser
from saekit.data.cache import write_activation_cache
from saekit.data.pretokenize import pretokenize
from saekit.data.store import ActivationStore
from saekit.evals import evaluate_saes
from saekit.models import load_model
from saekit.models.tiny import TINY_TEXTS, tiny_gpt2, tiny_hooked_transformer, tiny_tokenizer
from saekit.progress import (
    bar,
    progress_enabled,
    progress_off,
    set_progress,
    silence_library_noise,
    status,
)

HOOK = "blocks.1.hook_resid_pre"
TEXTS = [f"{text} Number {i}." for i, text in enumerate(list(TINY_TEXTS) * 8)]

pytestmark = pytest.mark.usefixtures("one_thread")


def rate(unit: str) -> re.Pattern[str]:
    """A tqdm rate such as `1.23ktok/s` or `512latent/s`."""
    return re.compile(rf"\d[\d.]*[kMG]?{unit}/s")


@pytest.fixture(autouse=True)
def progress_on() -> Iterator[None]:
    previous = set_progress(True)
    yield
    set_progress(previous)




@pytest.fixture(scope="module")
def backend():
    return load_model("bundled")


@pytest.fixture(scope="module")
def sae(backend) -> SAE:
    torch.manual_seed(0)
    meta = SAEMetadata(model_name="bundled", hook_name=HOOK, context_size=32)
    return SAE.create("topk", d_in=256, d_sae=512, k=16, metadata=meta)


@pytest.fixture(scope="module")
def batches(backend) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, len(backend.tokenizer), (8, 32), generator=generator)
    tokens[:, 0] = backend.tokenizer.bos_token_id
    return list(tokens.split(4))


def test_bar_has_unit_and_rate_and_obeys_the_switch(capsys: pytest.CaptureFixture[str]) -> None:
    for _ in bar(range(3000), desc="counting", unit="tok"):
        pass
    err = capsys.readouterr().err
    assert "counting: 100%" in err and "3.00k/3.00k" in err and rate("tok").search(err)
    with progress_off():
        assert not progress_enabled()
        for _ in bar(range(10), desc="hidden", unit="tok"):
            pass
        with status("hidden too"):
            pass
    for _ in bar(range(10), desc="declined", unit="tok", progress=False):
        pass
    assert progress_enabled() and not progress_enabled(False)
    assert capsys.readouterr().err == ""


def test_status_line_counts_seconds(capsys: pytest.CaptureFixture[str]) -> None:
    with status("resting"):
        pass
    assert re.search(r"resting: \d+\.\d s", capsys.readouterr().err)
    with pytest.raises(KeyError), status("breaking"):
        raise KeyError("x")
    assert re.search(r"breaking: failed after \d+\.\d s", capsys.readouterr().err)


def test_model_load_shows_one_line_and_no_loading_weights_bar(
    capfd: pytest.CaptureFixture[str],
) -> None:
    load_model("bundled")
    err = capfd.readouterr().err
    assert re.search(r"loading model bundled: \d+\.\d s", err)
    assert "Loading weights" not in err
    with progress_off():
        load_model("bundled")
    assert capfd.readouterr().err == ""


def test_evaluation_statistics_and_dashboard_bars(
    backend, sae, batches, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evaluate_saes(backend, [sae], batches)
    err = capsys.readouterr().err
    assert "evaluating: 100%" in err and "256/256" in err and rate("tok").search(err)
    stats = feature_statistics(sae, backend, batches, top_k=2, n_samples=2)
    err = capsys.readouterr().err
    assert "feature statistics: 100%" in err and rate("tok").search(err)
    write_dashboard(stats, backend.tokenizer, tmp_path / "site")
    err = capsys.readouterr().err
    assert "dashboard: 100%" in err and "512/512" in err and rate("latent").search(err)

    evaluate_saes(backend, [sae], batches, downstream=False, progress=False)
    feature_statistics(sae, backend, batches, top_k=2, n_samples=2, progress=False)
    write_dashboard(stats, backend.tokenizer, tmp_path / "quiet", progress=False)
    with progress_off():
        evaluate_saes(backend, [sae], batches, downstream=False)
    assert capsys.readouterr().err == ""


def test_norm_estimate_cache_and_tokenizing_bars(
    backend, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ActivationStore(backend, HOOK, TEXTS, context_size=16, batch_size=64,
                            buffer_size=64, model_batch_size=4)
    store.estimate_norm_scaling_factor(2)
    err = capsys.readouterr().err
    assert "norm estimate: 100%" in err and "128/128" in err and rate("tok").search(err)
    store.estimate_norm_scaling_factor(2, progress=False)
    assert capsys.readouterr().err == ""

    write_activation_cache(backend, HOOK, TEXTS, tmp_path / "cache", 200, context_size=16,
                           model_batch_size=4, shard_rows=64)
    err = capsys.readouterr().err
    assert "caching activations: 100%" in err and "200/200" in err and rate("tok").search(err)
    write_activation_cache(backend, HOOK, TEXTS, tmp_path / "cache2", 50, context_size=16,
                           progress=False)
    assert capsys.readouterr().err == ""

    # Text no earlier run has seen: datasets would reuse its cached result of the same text.
    texts = [f"{text} {tmp_path}" for text in TEXTS]
    pretokenize(texts, backend.tokenizer, tmp_path / "tokens", context_size=16, max_windows=20)
    err = capsys.readouterr().err
    assert "tokenizing: 100%" in err and "320/320" in err and rate("tok").search(err)
    pretokenize(texts[::-1], backend.tokenizer, tmp_path / "tokens2", context_size=16,
                max_windows=5, progress=False)
    assert capsys.readouterr().err == ""


def test_train_bars_follow_run_progress(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_hooked_transformer(tokenizer=tiny_tokenizer())

    def config(out: str, progress: bool) -> dict:
        return {
            "sae": {"architecture": "topk", "expansion_factor": 2, "k": 8},
            "data": {"context_size": 32, "eval_tokens": 256},
            "training": {"tokens": 256 * 4, "batch_size": 256},
            "run": {"out": str(tmp_path / out), "progress": progress},
        }

    saekit.train(config("shown", True), model=model, dataset=TEXTS * 4)
    err = capsys.readouterr().err
    for step in ("norm estimate", "training", "evaluating"):
        assert f"{step}: 100%" in err, step
    assert len(rate("tok").findall(err)) >= 3
    saekit.train(config("hidden", False), model=model, dataset=TEXTS * 4)
    assert capsys.readouterr().err == ""
    assert progress_enabled()  # the run's setting does not outlive the run


def test_output_flags_before_and_after_the_command() -> None:
    parse = build_parser().parse_args
    assert parse(["--no-progress", "eval", "x"]).no_progress
    assert parse(["eval", "x", "--no-progress"]).no_progress
    assert not parse(["eval", "x"]).no_progress
    assert parse(["-q", "dashboard", "x", "--out", "d"]).quiet
    assert parse(["dashboard", "x", "--out", "d", "--quiet"]).quiet
    assert parse(["pretrained", "list", "-q"]).quiet
    args = parse(["train", "--no-progress", "-q"])
    assert getattr(args, "run.progress") is False and args.quiet and not args.no_progress
    assert parse(["--no-progress", "train"]).no_progress


@pytest.fixture
def transformers_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """What transformers' modeling logger lets through its filters, at its default level.

    Read with a handler of our own: transformers logs to a handler holding the stderr of its
    import (out of reach of capfd; hence the import at the top of this file). Importing
    TransformerLens's bridge raises transformers' level to ERROR for the whole process,
    which would hide the warnings under test, hence the level."""
    logger = logging.getLogger("transformers.modeling_utils")
    level = logger.level
    logger.setLevel(logging.WARNING)
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(level)


def test_no_attention_mask_warning_from_the_bundled_model(
    backend, batches, transformers_log: pytest.LogCaptureFixture
) -> None:
    tokens = batches[0].clone()
    tokens[:, -1] = backend.tokenizer.pad_token_id  # the pad id at the last position, too
    modeling = logging.getLogger("transformers.modeling_utils")
    noise = [f for f in modeling.filters if type(f).__name__ == "_LibraryNoise"]
    assert noise, "load_model installs the filter"
    # Without the filter this very forward pass warns (transformers warns once per process,
    # so its memory of having warned is cleared first).
    modeling.removeFilter(noise[0])
    try:
        hf_logging.warning_once.cache_clear()
        backend.logits(tokens)
        assert "attention_mask" in transformers_log.text
    finally:
        modeling.addFilter(noise[0])
    transformers_log.clear()
    hf_logging.warning_once.cache_clear()
    backend.logits(tokens)
    backend.activations(tokens, [HOOK])
    assert transformers_log.text == ""


def test_load_reports_unused_weights_hidden_missing_ones_named(
    tmp_path: Path, transformers_log: pytest.LogCaptureFixture
) -> None:
    silence_library_noise()
    folder = tmp_path / "model"
    tiny_gpt2(300).save_pretrained(folder)
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    tensors["extra.unused"] = torch.zeros(3)
    save_file(tensors, weights, metadata={"format": "pt"})
    AutoModelForCausalLM.from_pretrained(folder)
    assert transformers_log.text == ""

    del tensors["transformer.h.0.mlp.c_fc.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    AutoModelForCausalLM.from_pretrained(folder)
    assert transformers_log.records
    for record in transformers_log.records:
        message = record.getMessage()
        assert record.levelno == logging.WARNING and "LOAD REPORT" not in message
        assert "transformer.h.0.mlp.c_fc.weight" in message and "extra.unused" not in message
        assert "randomly initialised" in message and os.fspath(folder) in message
