"""Sparse probing: planted class latents, an identity SAE, and a run on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from saekit import SAE
from saekit.evals.context import EvalData, TextActivations
from saekit.evals.probe_data import ProbeDataset
from saekit.evals.probes import pooled_latents, probe_task_accuracy, top_k_mean_diff
from saekit.evals.probing import (
    HEADLINE,
    SparseProbingConfig,
    _accuracies,
    plot_sparse_probing,
    run_sparse_probing,
)
from saekit.evals.results import SAEBENCH_FIELDS, write_saebench_json
from saekit.sites import SAESite

HOOK = "blocks.1.hook_resid_pre"


def identity_sae(d: int, shift: float = 0.0) -> SAE:
    """A standard SAE whose latents are the input plus `shift` (on inputs above -shift) and
    whose reconstruction is the input."""
    sae = SAE.create("standard", d, d, apply_b_dec_to_input=True)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
        sae.b_enc.zero_()
        sae.b_dec.fill_(-shift)
    return sae


def planted_acts(labels: np.ndarray, d: int, signal: dict[int, float], seed: int = 0
                 ) -> TextActivations:
    """Non-negative token activations [n, 6, d] whose dims in `signal` rise by that much on
    texts of label 1; the last two positions of odd texts are padding."""
    gen = torch.Generator().manual_seed(seed)
    acts = torch.rand(len(labels), 6, d, generator=gen)
    for dim, size in signal.items():
        acts[:, :, dim] += size * torch.as_tensor(labels, dtype=torch.float32)[:, None]
    mask = torch.ones(len(labels), 6, dtype=torch.bool)
    mask[1::2, 4:] = False
    acts[~mask] = 100.0  # padding must not leak into the pooled values
    return TextActivations(acts, torch.zeros(len(labels), 6, dtype=torch.long), mask)


def test_top_k_selection_finds_the_planted_latents() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 50)
    x = rng.normal(size=(100, 20))
    x[:, 7] += 3 * y
    x[:, 2] -= 1.5 * y
    assert list(top_k_mean_diff(x, y, 2)) == [7, 2]
    tr, te = np.arange(0, 100, 2), np.arange(1, 100, 2)
    assert probe_task_accuracy(x[tr][:, [7]], y[tr], x[te][:, [7]], y[te]) > 0.9


def test_pooled_latents_are_the_mean_over_each_texts_own_tokens() -> None:
    y = np.repeat([0, 1], 40)
    acts = planted_acts(y, 8, {5: 2.0})
    pooled = pooled_latents(identity_sae(8), acts, batch_size=7)
    assert np.allclose(pooled, acts.mean_pooled().numpy(), atol=1e-6)
    assert pooled.max() < 4  # no padding value (100) counted
    assert top_k_mean_diff(pooled, y, 1)[0] == 5


def _task_dataset(y: np.ndarray) -> ProbeDataset:
    n = len(y)
    return ProbeDataset(
        "planted", tuple(f"t{i}" for i in range(n)), {"y": tuple("ab"[v] for v in y)},
        {"y": ("b", "a")}, tuple(bool(i % 4 == 0) for i in range(n)),
    )


def test_planted_latents_give_high_accuracy_and_random_labels_chance() -> None:
    rng = np.random.default_rng(1)
    y = rng.permutation(np.repeat([0, 1], 100))
    acts = planted_acts(y, 16, {3: 1.0})
    latents = pooled_latents(identity_sae(16), acts)
    (task,) = _task_dataset(y).binary_tasks(seed=0)
    found = _accuracies(latents, [task], [1, 2], "sae", progress=False)
    assert found["sae_top_1_test_accuracy"][task.name] > 0.95
    noise = rng.permutation(y)  # labels unrelated to the activations
    (random_task,) = _task_dataset(noise).binary_tasks(seed=0)
    chance = _accuracies(latents, [random_task], [1], "sae", progress=False)
    assert 0.25 < chance["sae_top_1_test_accuracy"][random_task.name] < 0.75


def test_identity_sae_matches_the_raw_activation_probe() -> None:
    rng = np.random.default_rng(2)
    y = rng.permutation(np.repeat([0, 1], 60))
    acts = planted_acts(y, 12, {0: 0.3, 4: 0.2})
    latents = pooled_latents(identity_sae(12), acts)
    tasks = _task_dataset(y).binary_tasks(seed=0)
    llm = _accuracies(acts.mean_pooled().numpy(), tasks, [12], "llm", progress=False)
    sae = _accuracies(latents, tasks, [12], "sae", progress=False)
    assert sae["sae_top_12_test_accuracy"] == llm["llm_top_12_test_accuracy"]
    assert sae["sae_test_accuracy"] == llm["llm_test_accuracy"]


# A tiny random model that is not the bundled one


@pytest.fixture(scope="module")
def tiny_data() -> EvalData:
    from saekit.models import load_model
    from saekit.models.tiny import tiny_llama, tiny_tokenizer

    backend = load_model(tiny_llama(), tokenizer=tiny_tokenizer())
    return EvalData(backend, SAESite(HOOK, HOOK), context_size=24, progress=False)


def labelled_jsonl(path: Path, n: int = 64) -> Path:
    words = {"sea": "the ship sails on the grey sea and the wind", "land": "the cow eats the grass "
             "on the green hill by the farm"}
    rows = []
    for i in range(n):
        kind = "sea" if i % 2 else "land"
        size = "big" if i % 3 else "small"
        rows.append({"text": f"{words[kind]} {i}", "label": kind, "size": size})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_end_to_end_on_a_tiny_model(tiny_data, tmp_path) -> None:
    source = labelled_jsonl(tmp_path / "sea.jsonl")
    config = SparseProbingConfig(dataset_names=[str(source)], k_values=[1, 2, 32],
                                 label_columns=["label", "size"])
    shifted = identity_sae(32, shift=20.0)
    from sae_factory import random_sae

    results = run_sparse_probing([random_sae("topk", 32, 64, k=8), shifted], tiny_data, config)
    assert len(results) == 2
    # SAEBench's schema names every k of 1, 2, 5, 10, 20, 50, 100; k = 32 comes after them.
    ks = [1, 2, 5, 10, 20, 50, 100, 32]
    llm_names = ["llm_test_accuracy", *(f"llm_top_{k}_test_accuracy" for k in ks)]
    sae_names = ["sae_test_accuracy", *(f"sae_top_{k}_test_accuracy" for k in ks)]
    run = {"llm_test_accuracy", "sae_test_accuracy"} | {
        f"{p}_top_{k}_test_accuracy" for p in ("llm", "sae") for k in (1, 2, 32)
    }
    for result in results:
        assert result.eval_type_id == "sparse_probing"
        assert list(result.metrics) == ["llm", "sae"]
        assert list(result.metrics["llm"]) == llm_names
        assert list(result.metrics["sae"]) == sae_names
        (detail,) = result.details
        assert detail["dataset_name"] == f"{source}_results"
        assert list(detail) == ["dataset_name", *llm_names, *sae_names]
        for name, value in [*result.metrics["llm"].items(), *result.metrics["sae"].items()]:
            assert (0.0 <= value <= 1.0) if name in run else value is None
        tasks = result.unstructured[f"{source}_results"]["sae_test_accuracy"]
        assert set(tasks) == {"label: land / sea", "size: big / small"}
        assert result.eval_config["k_values"] == [1, 2, 32]
        assert result.eval_config["context_length"] == 24
    # Latents that are the activations shifted give the raw-activation probe's accuracy.
    shifted_sae = results[1].metrics["sae"]
    n_test = 2 * 6  # the smaller class of each task has 6 test rows at least
    assert shifted_sae["sae_top_32_test_accuracy"] == pytest.approx(
        results[1].metrics["llm"]["llm_test_accuracy"], abs=1 / n_test
    )
    out = write_saebench_json(results[0], shifted, tmp_path / "r.json")
    record = json.loads(out.read_text())
    assert list(record) == list(SAEBENCH_FIELDS)
    png = plot_sparse_probing({"topk": results[0], "identity": results[1]}, tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [results[0].metric(dotted) is None for dotted in HEADLINE] == [False, False, True, True]


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="k_values"):
        SparseProbingConfig(k_values=[0, 1])
    with pytest.raises(ValueError, match="dataset_names"):
        SparseProbingConfig(dataset_names=[])
