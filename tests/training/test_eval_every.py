"""`run.eval_every`: held-out evaluation during training, on one fixed sample, into
log.jsonl; its figures equal a direct evaluation of the checkpoint written at that point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import saekit
from saekit.evals import make_evaluator
from saekit.models.tiny import tiny_hooked_transformer, tiny_tokenizer
from saekit.training import checkpoint as ckpt
from saekit.training.periodic_eval import heldout_sample
from saekit.training.run import flat_record
from saekit.training.runlog import read_log

TEXTS = [f"to be or not to be, that is the question number {i}. " * 12 for i in range(120)]
HOOK = "blocks.1.hook_resid_pre"


def config(out: Path, **run: object) -> dict:
    return {
        "sae": {"architecture": "topk", "expansion_factor": 2, "k": 8},
        "data": {"context_size": 32, "eval_tokens": 512, "hook_name": HOOK},
        "training": {"tokens": 256 * 12, "batch_size": 256, "lr": 1e-3},
        "run": {"out": str(out), "progress": False, "log_every": 4, "checkpoint_every": 1024,
                "keep_checkpoints": 3, "eval_every": 1024, "eval_every_tokens": 128, **run},
    }


@pytest.fixture(scope="module")
def model() -> object:
    return tiny_hooked_transformer(tokenizer=tiny_tokenizer())


def test_eval_records_match_a_direct_evaluation_of_the_checkpoint(
    tmp_path: Path, model: object
) -> None:
    out = saekit.train(config(tmp_path / "run"), model=model, dataset=TEXTS)
    run = out.run_dir
    evals = [r for r in read_log(run) if "eval" in r]
    assert [r["tokens"] for r in evals] == [1024, 2048, 3072]
    assert [r["step"] for r in evals] == [4, 8, 12]
    # The same sample every time: 128 tokens, 4 sequences of 32.
    assert {r["eval"]["n_tokens"] <= 128 for r in evals} == {True}
    state = ckpt.read_checkpoint(run / "checkpoints" / f"tokens_{2048:015d}")
    sae = saekit.SAE.load(run)
    sae.load_state_dict(state["jobs"]["sae"]["sae"])
    factor = json.loads((run / "run_state.json").read_text())["norm_scaling_factor"]
    with torch.no_grad():
        sae.fold_activation_norm_scaling_factor(factor)
        sae.fold_W_dec_norm()
    sample = heldout_sample(out.heldout.batches, 128)
    assert sum(b.numel() for b in sample) == 128
    want = make_evaluator(model, sample, hook=HOOK)(sae)
    got = evals[1]["eval"]
    for key in ("l0", "explained_variance", "ce_loss_score", "kl_div_score", "mse"):
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key
    # Later checkpoints differ: the record is of that point, not of the end.
    assert evals[0]["eval"]["mse"] != pytest.approx(evals[2]["eval"]["mse"], rel=1e-6)


def test_several_saes_evaluated_together_and_split_into_their_logs(
    tmp_path: Path, model: object
) -> None:
    cfg = config(tmp_path / "run", eval_every=1536)
    cfg["sweep"] = {"k": [4, 8]}
    out = saekit.train(cfg, model=model, dataset=TEXTS)
    names = [f"{HOOK}__k=4", f"{HOOK}__k=8"]
    evals = [r for r in read_log(out.run_dir) if "eval" in r]
    assert [r["tokens"] for r in evals] == [1536, 3072]
    assert all(list(r["eval"]) == names for r in evals)
    for name, k in zip(names, (4, 8), strict=True):
        own = [r for r in read_log(out.run_dir / name) if "eval" in r]
        assert [r["eval"] for r in own] == [r["eval"][name] for r in evals]
        assert own[-1]["eval"]["l0"] == pytest.approx(k)


def test_eval_records_flatten_for_weights_and_biases() -> None:
    record = {"step": 4, "tokens": 1024, "eval": {"a": {"l0": 3.0}, "b": {"l0": 5.0}}}
    assert flat_record(record) == {
        "step": 4, "tokens": 1024, "eval/a/l0": 3.0, "eval/b/l0": 5.0,
    }


def test_heldout_sample_takes_whole_sequences_from_the_front() -> None:
    batches = [torch.arange(24).view(3, 8), torch.arange(24, 48).view(3, 8)]
    got = heldout_sample(batches, 30)
    assert [b.shape for b in got] == [(3, 8), (1, 8)]
    assert torch.equal(got[1], batches[1][:1])
    assert sum(b.numel() for b in heldout_sample(batches, 1000)) == 48
