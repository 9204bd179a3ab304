"""The evaluation suite: `saekit eval --suite`, `evaluate(..., suite=...)`, shared activations
and the written results, on a tiny random Llama-style model (not the bundled one)."""

from __future__ import annotations

import json

import pytest
import torch
from sae_factory import random_sae

from saekit import SAEMetadata, evaluate
from saekit.cli import main
from saekit.evals.context import EvalData
from saekit.evals.results import SAEBENCH_FIELDS, SuiteResult
from saekit.evals.suite import parse_suite, run_downstream
from saekit.models import load_model
from saekit.models.tiny import tiny_llama, tiny_tokenizer

HOOK = "blocks.1.hook_resid_pre"
D = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def labelled_jsonl(path, n: int = 48):
    kinds = {"sea": "the ship sails on the grey sea", "land": "the cow eats grass on the hill",
             "sky": "a bird flies high over the clouds"}
    names = list(kinds)
    rows = [
        {"text": f"{kinds[names[i % 3]]} {i}", "place": names[i % 3],
         "size": "big" if i % 2 else "small"}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def saved_sae(folder, model_dir: str, seed: int):
    sae = random_sae("topk", D, 64, seed=seed, k=8)
    sae.cfg.metadata = SAEMetadata(model_name=model_dir, hook_name=HOOK, context_size=16)
    sae.save(folder)
    return sae


def test_parse_suite() -> None:
    assert parse_suite(None) == ["core"]
    assert parse_suite("tpp, CORE") == ["core", "tpp"]  # suite order, any case
    assert parse_suite("all") == ["core", "sparse_probing", "scr", "tpp", "absorption"]
    with pytest.raises(ValueError, match=r"unknown evaluation 'probing' \(did you mean "
                       "sparse_probing"):
        parse_suite("core,probing")


def test_activations_are_computed_once_per_site(model_dir, tmp_path, monkeypatch) -> None:
    backend = load_model(model_dir)
    calls: list[int] = []
    original = backend.activations

    def counting(tokens, hooks):
        calls.append(tokens.shape[0])
        return original(tokens, hooks)

    monkeypatch.setattr(backend, "activations", counting)
    saes = [random_sae("topk", D, 64, seed=s, k=8) for s in range(2)]
    for sae in saes:
        sae.cfg.metadata = SAEMetadata(hook_name=HOOK)
    source = labelled_jsonl(tmp_path / "d.jsonl")
    from saekit.evals.probing import SparseProbingConfig

    config = SparseProbingConfig(dataset_names=[str(source)], k_values=[1, 2],
                                 label_columns=["place"])
    found = run_downstream(saes, ["sparse_probing"], backend, context_size=16,
                           configs={"sparse_probing": config})
    # One model pass over the 48 texts serves both SAEs.
    assert sum(calls) == 48
    assert [set(per_sae) for per_sae in found] == [{"sparse_probing"}] * 2


def test_cli_suite_with_a_user_dataset(model_dir, tmp_path, capsys) -> None:
    source = labelled_jsonl(tmp_path / "d.jsonl")
    for seed, name in enumerate(("a", "b")):
        saved_sae(tmp_path / name, model_dir, seed)
    out = tmp_path / "out"
    rc = main([
        "eval", str(tmp_path / "a"), str(tmp_path / "b"), "--suite", "sparse_probing,tpp",
        "--probe-dataset", str(source), "--label-column", "place", "--out", str(out),
        "--no-progress",
    ])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "sparse_probing" in printed and "tpp" in printed
    assert not (out / "metrics.csv").exists()  # core was not asked for
    for eval_type in ("sparse_probing", "tpp"):
        files = sorted((out / eval_type).glob("*_eval_results.json"))
        assert len(files) == 2
        record = json.loads(files[0].read_text())
        assert list(record) == list(SAEBENCH_FIELDS)
        assert record["eval_type_id"] == eval_type
        assert record["eval_config"]["dataset_names"] == [str(source)]
        assert (out / f"{eval_type}.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--suite", "core,nonsense"], "unknown evaluation 'nonsense'"),
        (["--suite", "sparse_probing", "--label-column", "x"], "name the dataset too"),
        (["--probe-dataset", "author"], "add one of them to --suite"),
        (["--suite", "sparse_probing", "--probe-dataset", "MISSING.csv"], "MISSING.csv"),
    ],
)
def test_cli_suite_errors(model_dir, tmp_path, capsys, flags, message) -> None:
    saved_sae(tmp_path / "a", model_dir, 0)
    rc = main(["eval", str(tmp_path / "a"), "--out", str(tmp_path / "out"), *flags])
    assert rc != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("saekit: error:") and message in err[0]
    assert not (tmp_path / "out").exists()  # nothing was written before the check


def test_evaluate_with_a_suite_returns_every_result(model_dir, tmp_path) -> None:
    sae = random_sae("topk", D, 64, k=8)
    sae.cfg.metadata = SAEMetadata(model_name=model_dir, hook_name=HOOK, context_size=16)
    from saekit.evals.probing import SparseProbingConfig

    config = SparseProbingConfig(dataset_names=[str(labelled_jsonl(tmp_path / "d.jsonl"))],
                                 k_values=[1], label_columns=["place"])
    texts = ["the cat sat on the mat and looked at the sea"] * 8
    found = evaluate(sae, dataset=texts, tokens=64, suite=["core", "sparse_probing"],
                     configs={"sparse_probing": config})
    assert isinstance(found, SuiteResult)
    assert found.names() == ["core", "sparse_probing"]
    # Core's figures are the plain evaluation's.
    plain = evaluate(sae, dataset=texts, tokens=64)
    assert found["core"].metric("sparsity.l0") == pytest.approx(plain.l0)
    assert found.metrics is not None and torch.equal(
        found.metrics.firing_frequency, plain.firing_frequency
    )


def test_eval_data_masks_padding_and_framing(model_dir) -> None:
    from saekit.sites import SAESite

    data = EvalData(load_model(model_dir), SAESite(HOOK, HOOK), context_size=6)
    acts = data.text_activations("t", ["the cat", "the cat sat on the mat and the dog"])
    tokenizer = tiny_tokenizer()
    short = len(tokenizer("the cat", add_special_tokens=False)["input_ids"])
    # Row 0: BOS + its tokens, then padding; row 1: cut to 6 tokens, BOS included.
    assert acts.tokens.shape == (2, 6)
    assert acts.mask[0].tolist() == [False] + [True] * short + [False] * (5 - short)
    assert acts.mask[1].tolist() == [False] + [True] * 5
    pooled = acts.mean_pooled()
    assert torch.allclose(pooled[0], acts.acts[0, 1 : 1 + short].mean(0))
