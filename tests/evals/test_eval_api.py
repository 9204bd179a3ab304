"""`evaluate`, `make_evaluator` and `saekit eval` on a tiny Hugging Face model saved locally."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from saekit import SAE, SAEConfig, SAEMetadata, evaluate, make_evaluator
from saekit.cli import main
from saekit.evals import METRIC_NAMES, evaluate_saes, heldout_token_batches
from saekit.models import load_model
from saekit.models.tiny import TINY_TEXTS, tiny_gpt2, tiny_tokenizer

D_MODEL = 32
HOOK = "blocks.1.hook_resid_pre"
TEXTS = list(TINY_TEXTS) * 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    tiny_gpt2(300, d_model=D_MODEL).save_pretrained(folder)
    tiny_tokenizer(300).save_pretrained(folder)
    return str(folder)


def identity_sae(model_name: str | None, hook: str = HOOK) -> SAE:
    meta = SAEMetadata(model_name=model_name, hook_name=hook, context_size=16)
    sae = SAE.from_config(SAEConfig("standard", d_in=D_MODEL, d_sae=2 * D_MODEL, metadata=meta))
    eye = torch.eye(D_MODEL)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_evaluate_takes_the_model_from_metadata(model_dir) -> None:
    m = evaluate(identity_sae(model_dir), dataset=TEXTS, tokens=160)
    assert m.ce_loss_score == pytest.approx(1.0, abs=1e-6)
    assert m.explained_variance == pytest.approx(1.0, abs=1e-12)
    # BOS and the EOS between packed documents are not evaluated.
    tokenizer = load_model(model_dir).tokenizer
    batches = heldout_token_batches(tokenizer, 160, dataset=TEXTS, context_size=16)
    ids = torch.cat(batches)
    assert ids.numel() == 160 and bool((ids[:, 0] == tokenizer.bos_token_id).all())
    specials = (ids == tokenizer.bos_token_id) | (ids == tokenizer.eos_token_id)
    assert m.n_tokens == int((~specials).sum())


def test_model_errors(model_dir, tmp_path) -> None:
    with pytest.raises(ValueError, match="model_name"):
        evaluate(identity_sae(None), dataset=TEXTS, tokens=32)
    with pytest.raises(ValueError, match="could not load the model"):
        evaluate(identity_sae(str(tmp_path)), dataset=TEXTS, tokens=32)


def test_make_evaluator_matches_a_direct_evaluation(model_dir) -> None:
    backend = load_model(model_dir)
    tokens = torch.cat(heldout_token_batches(backend.tokenizer, 96, dataset=TEXTS, context_size=16))
    evaluator = make_evaluator(backend, tokens, batch_size=2)
    sae = identity_sae(None)
    with torch.no_grad():
        sae.W_dec.mul_(0.5)  # a lossy SAE, so the figures are not trivial
    sae.train()
    values = evaluator(sae)
    assert sae.training  # the caller's mode is restored
    (direct,) = evaluate_saes(backend, [sae], list(tokens.split(3)))
    assert values == pytest.approx(direct.to_dict())
    assert set(METRIC_NAMES) <= set(values)
    assert evaluator.last is not None and evaluator.last.firing_frequency.shape == (2 * D_MODEL,)
    # A half-scale reconstruction: x^ = x / 2, so l2_ratio 1/2, cos 1, mse E||x||^2 / 4.
    assert values["l2_ratio"] == pytest.approx(0.5)
    assert values["cos_sim"] == pytest.approx(1.0)
    assert values["relative_reconstruction_bias"] == pytest.approx(0.5)


def test_cli_writes_metrics_csv_and_plot(model_dir, tmp_path) -> None:
    text_file = tmp_path / "heldout.txt"
    text_file.write_text("\n".join(TEXTS) + "\n")
    a = identity_sae(model_dir)
    b = identity_sae(model_dir, hook="blocks.0.hook_resid_post")
    with torch.no_grad():
        b.W_dec.zero_()
    a.save(tmp_path / "sae_a")
    b.save(tmp_path / "sae_b")
    out = tmp_path / "results"
    rc = main(
        [
            "eval",
            str(tmp_path / "sae_a"),
            str(tmp_path / "sae_b"),
            "--dataset",
            str(text_file),
            "--tokens",
            "64",
            "--context-size",
            "16",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 2 and set(METRIC_NAMES) <= set(rows[0])
    folders = sorted(p for p in out.iterdir() if (p / "metrics.json").is_file())
    assert len(folders) == 2
    # The same figures in SAEBench's layout, one file per SAE under core/.
    core = json.loads((out / "core" / f"{folders[0].name}_eval_results.json").read_text())
    assert core["eval_type_id"] == "core"
    assert core["eval_result_metrics"]["model_performance_preservation"][
        "ce_loss_score"] == pytest.approx(1.0, abs=1e-6)
    assert (out / "core.png").read_bytes()[:4] == b"\x89PNG"
    first = json.loads((folders[0] / "metrics.json").read_text())
    assert first["ce_loss_score"] == pytest.approx(1.0, abs=1e-6)
    second = json.loads((folders[1] / "metrics.json").read_text())
    assert second["ce_loss_score"] == pytest.approx(0.0, abs=1e-9)
    # Its encoder is still the identity's (one latent per coordinate), its output zero.
    assert second["l0"] == pytest.approx(D_MODEL)
    assert second["explained_variance"] < 0
    png = (folders[0] / "feature_density.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (folders[0] / "feature_stats.safetensors").is_file()


def test_cli_unknown_target(tmp_path, capsys) -> None:
    rc = main(["eval", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "no such folder" in capsys.readouterr().err  # not a Hub lookup
