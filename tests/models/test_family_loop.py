"""The whole loop on a tiny random model of every family: cache, train (from the cache and
from the model), evaluate and splice, with each family's own tokenizer and BOS rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from models.families import DECODER_FAMILIES, ENCODER_FAMILIES, build_family, build_tokenizer

import saekit
from saekit.analysis import SplicedModel
from saekit.cli import main
from saekit.models import load_model

TEXTS = [f"Entry {i}: the harbour lamps were lit as the boats came home. " * 3 for i in range(300)]
CONTEXT = 16
#: The hook each family's SAE reads: a TransformerLens name on decoders, the model's own
#: module path on encoders (which have no TransformerLens names).
ENCODER_HOOKS = {
    "bert": "encoder.layer.0.output",
    "sentence_transformers": "encoder.layer.0.output",
    "t5_encoder": "encoder.block.0.output",
}
#: What each tokenizer should frame a window with when prepend_bos is left to it.
EXPECTED_FRAMING = {
    "qwen2": "none", "qwen3": "none",
    "bert": "tokenizer", "sentence_transformers": "tokenizer", "t5_encoder": "tokenizer",
}


def hook_for(family: str) -> str:
    return ENCODER_HOOKS.get(family, "blocks.1.hook_resid_pre")


def run_config(out: Path, family: str, **data: object) -> dict:
    return {
        "sae": {"architecture": "topk", "expansion_factor": 2, "k": 8},
        "data": {
            "hook_name": hook_for(family), "context_size": CONTEXT, "eval_tokens": 256, **data,
        },
        "training": {"tokens": 1024, "batch_size": 256},
        "run": {"out": str(out), "progress": False, "report": False},
    }


@pytest.mark.parametrize("family", DECODER_FAMILIES + ENCODER_FAMILIES)
def test_cache_train_eval_splice(family: str, tmp_path: Path) -> None:
    from saekit.data.tokens import sequence_framing

    folder = build_family(family, tmp_path / family)
    backend = load_model(folder)
    framing = sequence_framing(backend.tokenizer, None)[0]
    assert framing == EXPECTED_FRAMING.get(family, "bos")
    causal = family in DECODER_FAMILIES
    assert backend.causal_lm is causal

    # `saekit cache` on a text file leaves out the documents a run evaluates on; a run
    # trains from the cache and evaluates on exactly those.
    text = tmp_path / "notes.txt"
    text.write_text("\n".join(TEXTS) + "\n")
    cache = tmp_path / "cache"
    assert main([
        "cache", "--model", str(folder), "--hook", hook_for(family), "--dataset", str(text),
        "--tokens", "1024", "--context-size", str(CONTEXT), "--heldout-tokens", "256",
        "--out", str(cache),
    ]) == 0
    cached = saekit.train(
        run_config(tmp_path / "from_cache", family, model=str(folder), dataset=str(text),
                   activations=str(cache))
    )
    assert cached.heldout.heldout_documents > 0 and cached.metrics["n_tokens"] > 0

    # Train from the model by its folder, as `saekit train --model FOLDER` does.
    out = saekit.train(run_config(tmp_path / "run", family, model=str(folder)), dataset=TEXTS)
    sae = saekit.SAE.load(out.run_dir)
    meta = sae.cfg.metadata
    assert meta.model_name == str(folder.resolve()) and meta.hook_name == hook_for(family)
    assert meta.prepend_bos is (framing == "bos")
    assert (meta.extra.get("sequence_framing") == "tokenizer") is (framing == "tokenizer")
    assert 0 < out.metrics["explained_variance"] <= 1
    assert ("ce_loss_score" in out.metrics) is causal

    # Evaluate later from the metadata alone: the same model and framing.
    later = saekit.evaluate(sae, dataset=TEXTS[:40], tokens=256)
    assert later.l0 == pytest.approx(8.0)

    if not causal:
        return
    # Splice: the SAE changes the logits; with the error term it leaves them as they were.
    tokens = torch.tensor([build_tokenizer(family)(TEXTS[0])["input_ids"][:CONTEXT]])
    plain = backend.logits(tokens)
    spliced = SplicedModel(backend, [sae])
    assert not torch.allclose(spliced(tokens), plain, atol=1e-4)
    exact = SplicedModel(backend, [sae], use_error_term=True)
    torch.testing.assert_close(exact(tokens), plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("architecture", ["standard", "jumprelu"])
def test_dead_latent_remedies_on_a_model_without_bos(
    architecture: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A Qwen-style model (no BOS) trained to a target L0: the start at the target, the term
    # on quiet latents, lifting and (jumprelu) resampling all run through `saekit train`,
    # and the trainer logs how many latents it resampled.
    folder = build_family("qwen2", tmp_path / "qwen2")
    text = tmp_path / "notes.txt"
    text.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "run"
    args = [
        "train", "--model", str(folder), "--dataset", str(text), "--architecture", architecture,
        "--hook-name", hook_for("qwen2"), "--context-size", str(CONTEXT), "--expansion-factor",
        "4", "--tokens", "8192", "--batch-size", "256", "--target-l0", "6", "--eval-tokens",
        "256", "--dead-after-tokens", "1024", "--out", str(out), "--no-progress", "--no-report",
    ]
    assert main(args) == 0
    sae = saekit.SAE.load(out)
    assert sae.cfg.metadata.prepend_bos is False
    import json

    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert ("resampled" in records[-1]) is (architecture == "jumprelu")
    assert all(record["lr"] == sae.default_lr for record in records)

    # A setting out of range is one line naming it, not a traceback.
    bad = [*args[:-4], "--out", str(tmp_path / "bad"), "--no-progress", "--lift-share", "2"]
    assert main(bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("saekit: error:") and "lift_share" in err[-1]
    assert "Traceback" not in "\n".join(err)
