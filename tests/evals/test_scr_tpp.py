"""SCR and TPP: the metrics' arithmetic, planted concepts, and runs on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sae_factory import random_sae
from test_sparse_probing import HOOK, identity_sae, tiny_data  # noqa: F401 - a fixture

from saekit import SAE
from saekit.evals.context import TextActivations
from saekit.evals.probe_data import ProbeDataset
from saekit.evals.probes import Ablator, probe_accuracy
from saekit.evals.results import write_saebench_json
from saekit.evals.scr_tpp import (
    SCR_HEADLINE,
    TPP_HEADLINE,
    ScrConfig,
    TppConfig,
    _scr_baseline,
    _scr_one_sae,
    _tpp_baseline,
    _tpp_one_sae,
    latent_effects,
    plot_scr,
    plot_tpp,
    run_scr,
    run_tpp,
    scr_score,
    scr_sets,
    select_top_latents,
    tpp_scores,
)

# The arithmetic, against hand computations


def test_scr_score_is_the_share_of_the_gap_closed() -> None:
    # skyline 0.9, biased probe 0.6 on the target; ablation lifts it to 0.75: half the gap.
    assert scr_score(0.9, 0.6, 0.75) == pytest.approx(0.5)
    assert scr_score(0.9, 0.6, 0.9) == pytest.approx(1.0)
    assert scr_score(0.9, 0.6, 0.45) == pytest.approx(-0.5)
    assert scr_score(0.7005, 0.7, 0.9) == 0.0  # a gap under 0.001 scores 0


def test_tpp_scores_subtract_the_mean_drop_of_the_other_probes() -> None:
    clean = {"a": 0.9, "b": 0.8, "c": 0.95}
    after = {"a": 0.6, "b": 0.75, "c": 0.85}
    total, intended, unintended = tpp_scores(clean, after, "a")
    assert intended == pytest.approx(0.3)
    assert unintended == pytest.approx((0.05 + 0.10) / 2)
    assert total == pytest.approx(0.3 - 0.075)


def test_latent_selection_and_effects() -> None:
    effects = np.array([0.0, 3.0, -1.0, 3.0, 0.5, 0.0])
    assert list(select_top_latents(effects, 2)) == [1, 3]  # a tie goes to the lower index
    assert list(select_top_latents(effects, 10)) == [1, 3, 4, 2]  # zeros never chosen
    latents = np.array([[2.0, 0.0], [4.0, 1.0], [0.0, 3.0], [0.0, 5.0]])
    labels = np.array([1, 1, 0, 0])
    decoder = np.array([[1.0, 0.0], [0.0, -2.0]])  # latent 1 lowers dim 1
    direction = np.array([0.5, 1.0])
    # Mean differences: latent 0: 3 - 0 = 3; latent 1: 0.5 - 4 = -3.5.
    # Decoder rows . direction: 0.5 and -2.
    assert np.allclose(latent_effects(latents, labels, direction, decoder, True), [1.5, 7.0])
    assert np.allclose(latent_effects(latents, labels, direction, decoder, False), [1.5, 0.0])


# Planted concepts


def _dataset(columns: dict[str, list[str]], is_test: list[bool]) -> ProbeDataset:
    n = len(is_test)
    return ProbeDataset(
        "planted", tuple(f"t{i}" for i in range(n)), {c: tuple(v) for c, v in columns.items()},
        {c: tuple(dict.fromkeys(v)) for c, v in columns.items()}, tuple(is_test),
    )


def _acts(features: np.ndarray, seed: int) -> TextActivations:
    """Token activations [n, 4, d] whose mean over tokens is `features` (non-negative)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.as_tensor(features, dtype=torch.float32)[:, None, :].repeat(1, 4, 1)
    wiggle = torch.rand(base.shape, generator=gen) * 0.1
    acts = base + wiggle - wiggle.mean(1, keepdim=True) + 0.1  # same mean + 0.1, all >= 0
    return TextActivations(acts, torch.zeros(acts.shape[:2], dtype=torch.long),
                           torch.ones(acts.shape[:2], dtype=torch.bool))


@pytest.fixture(scope="module")
def scr_world() -> tuple[ProbeDataset, TextActivations]:
    """Attributes A (dims 0 / 3 for a+ / a-) and B (dims 1 / 2 for b+ / b-, stronger);
    dims 4-7 noise. Quadrant sizes: diagonal 80 train + 40 test, off-diagonal half that."""
    rng = np.random.default_rng(0)
    a_col, b_col, test, rows = [], [], [], []
    sizes = {("a+", "b+"): (80, 40), ("a-", "b-"): (80, 40), ("a+", "b-"): (40, 20),
             ("a-", "b+"): (40, 20)}
    for (a, b), (n_train, n_test) in sizes.items():
        for j in range(n_train + n_test):
            x = rng.uniform(0, 0.3, 8)
            x[0 if a == "a+" else 3] += max(1.0 + 0.6 * rng.normal(), 0)
            x[1 if b == "b+" else 2] += max(2.0 + 0.6 * rng.normal(), 0)
            a_col.append(a)
            b_col.append(b)
            test.append(j >= n_train)
            rows.append(x)
    ds = _dataset({"A": a_col, "B": b_col}, test)
    return ds, _acts(np.array(rows), 0)


def test_scr_sets_follow_saebench(scr_world) -> None:
    ds, _ = scr_world
    sets = scr_sets(ds, ("a+", "a-"), 0, 4000, 1000)
    for task, split_n in ((sets.a, 40), (sets.b, 40), (sets.biased, 40)):
        assert len(task.train_idx) == 4 * split_n
    a, b = np.array(ds.labels["A"]), np.array(ds.labels["B"])
    # The biased set pairs a+ with b+ only; the A set is balanced for B, and so on.
    biased = sets.biased.train_idx
    assert set(zip(a[biased], b[biased], strict=True)) == {("a+", "b+"), ("a-", "b-")}
    a_rows = sets.a.train_idx
    assert np.array_equal(sets.a.train_y, a[a_rows] == "a+")
    assert (b[a_rows[sets.a.train_y == 1]] == "b+").mean() == 0.5
    assert np.array_equal(sets.b.train_y, b[sets.b.train_idx] == "b+")
    assert not set(sets.a.train_idx) & set(sets.a.test_idx)
    with pytest.raises(ValueError, match="at least 2 test texts"):
        scr_sets(ds, ("a+", "a-"), 0, 4000, 4)


def test_ablating_the_spurious_latents_restores_the_target(scr_world) -> None:
    ds, acts = scr_world
    config = ScrConfig(n_values=[2, 9], probe_l1_c=10.0)
    baseline = _scr_baseline(acts.mean_pooled().numpy(), scr_sets(ds, ("a+", "a-"), 0, 4000,
                                                                    1000), 10.0)
    clean = baseline.accuracy
    assert clean["skyline_a"] > 0.9 and clean["biased_on_a"] < clean["skyline_a"] - 0.1
    assert clean["biased_on_a"] < clean["biased_on_b"]  # it leans on B: the target is A
    sae = identity_sae(8)
    scores, ablated = _scr_one_sae(sae, acts, baseline, config)
    assert scores["scr_dir1_threshold_2"] > 0.8  # B's two latents (1, 2) gone
    assert scores["scr_metric_threshold_2"] == scores["scr_dir1_threshold_2"]
    assert scores["scr_dir1_threshold_9"] is None  # more latents than the SAE has
    # Ablating latents unrelated to either attribute changes nothing.
    rows = baseline.sets.a.test_idx
    unrelated = Ablator(sae, acts, rows).ablated(np.array([5, 6]))
    after = probe_accuracy(baseline.probes["biased"], unrelated, baseline.sets.a.test_y)
    assert abs(scr_score(clean["skyline_a"], clean["biased_on_a"], after)) < 0.1


def test_tpp_ablating_a_class_latent_drops_only_its_probe() -> None:
    rng = np.random.default_rng(1)
    labels, rows, test = [], [], []
    for c in range(3):
        for j in range(90):
            x = rng.uniform(0, 0.3, 6)
            x[c] += 1.5 + 0.2 * rng.normal()
            labels.append(f"class{c}")
            rows.append(x)
            test.append(j >= 60)
    ds = _dataset({"kind": labels}, test)
    acts = _acts(np.array(rows), 1)
    config = TppConfig(n_values=[1, 3])
    tasks = ds.binary_tasks("kind", 0)
    baseline = _tpp_baseline(acts.mean_pooled().numpy(), tasks, config.probe_l1_c)
    assert min(baseline.accuracy.values()) > 0.95
    means, per_class = _tpp_one_sae(identity_sae(6), acts, baseline, config)
    for metrics in per_class.values():
        assert metrics["tpp_threshold_1_intended_diff_only"] > 0.3
        assert abs(metrics["tpp_threshold_1_unintended_diff_only"]) < 0.05
    assert means["tpp_threshold_1_total_metric"] == pytest.approx(
        np.mean([m["tpp_threshold_1_total_metric"] for m in per_class.values()])
    )


def test_pooled_ablation_equals_decoding_every_token(scr_world) -> None:
    _, acts = scr_world
    sae = random_sae("standard", 8, 24, seed=3)
    rows = np.arange(0, 120, 3)
    ablator = Ablator(sae, acts, rows, batch_size=16)
    assert ablator.linear
    chosen = np.array([0, 5, 7, 19])
    assert np.allclose(ablator.ablated(chosen), ablator._ablated_per_token(chosen), atol=1e-5)
    assert np.allclose(ablator.ablated(np.array([], dtype=np.int64)), ablator.clean)
    # An SAE that normalises each input is decoded token by token.
    normed = random_sae("standard", 8, 24, seed=3, normalize_activations="layer_norm")
    per_token = Ablator(normed, acts, rows)
    assert not per_token.linear
    assert np.allclose(per_token.ablated(np.array([], dtype=np.int64)), per_token.clean,
                       atol=1e-6)
    assert not np.allclose(per_token.ablated(np.arange(24)), per_token.clean)


# Runs on a tiny model that is not the bundled one


def _jsonl(path, rows) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return str(path)


def two_label_rows() -> list[dict[str, str]]:
    rows = []
    topic = {"sea": "the ship sails on the grey sea", "land": "the cow eats grass on the hill"}
    mood = {"glad": "and all are glad and sing", "sad": "and all are sad and weep"}
    sizes = {("sea", "glad"): 30, ("land", "sad"): 30, ("sea", "sad"): 15, ("land", "glad"): 15}
    for (t, m), n in sizes.items():
        rows += [{"text": f"{topic[t]} {mood[m]} {i}", "topic": t, "mood": m} for i in range(n)]
    return rows


def test_scr_end_to_end(tiny_data, tmp_path) -> None:  # noqa: F811 - the fixture
    source = _jsonl(tmp_path / "scr.jsonl", two_label_rows())
    config = ScrConfig(dataset_names=[source], label_columns=["topic", "mood"], n_values=[2, 5])
    saes = [random_sae("topk", 32, 64, k=8), identity_sae(32, shift=20.0)]
    results = run_scr(saes, tiny_data, config)
    names = [f"scr_{m}_threshold_{n}" for n in (2, 5, 10, 20, 50, 100, 500)
             for m in ("dir1", "metric", "dir2")]
    for result in results:
        assert result.eval_type_id == "scr"
        assert list(result.metrics) == ["scr_metrics"]
        assert list(result.metrics["scr_metrics"]) == names
        (detail,) = result.details
        assert detail["dataset_name"] == f"{source}_scr_land_sea_results"
        assert list(detail) == ["dataset_name", *names]
        for name, value in result.metrics["scr_metrics"].items():
            if not name.endswith(("_2", "_5")):
                assert value is None  # thresholds not run
            elif "metric" not in name:  # (the metric is None when both directions tie)
                assert value is not None and np.isfinite(value)
        clean = result.unstructured[f"{source}_scr_land_sea"]["clean"]
        assert all(0.0 <= v <= 1.0 for v in clean.values())
    assert set(results[0].eval_config) >= {"random_seed", "dataset_names", "perform_scr",
                                           "train_set_size", "test_set_size", "n_values",
                                           "column1_vals_lookup", "context_length"}
    record = json.loads(write_saebench_json(results[0], saes[0], tmp_path / "s.json").read_text())
    assert record["eval_type_id"] == "scr" and record["eval_config"]["perform_scr"] is True
    png = plot_scr({"topk": results[0], "identity": results[1]}, tmp_path / "scr.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    for dotted in SCR_HEADLINE:
        results[0].metric(dotted)  # the names exist


def test_tpp_end_to_end(tiny_data, tmp_path) -> None:  # noqa: F811 - the fixture
    words = {"sea": "the ship sails on the sea", "land": "the cow eats grass",
             "sky": "the bird flies high in the sky"}
    rows = [{"text": f"{w} {i}", "label": k} for k, w in words.items() for i in range(20)]
    source = _jsonl(tmp_path / "tpp.jsonl", rows)
    config = TppConfig(dataset_names=[source], n_values=[2, 5, 100])
    (result,) = run_tpp([random_sae("standard", 32, 64)], tiny_data, config)
    names = [f"tpp_threshold_{n}_{m}" for n in (2, 5, 10, 20, 50, 100, 500)
             for m in ("total_metric", "intended_diff_only", "unintended_diff_only")]
    assert result.eval_type_id == "tpp" and list(result.metrics["tpp_metrics"]) == names
    (detail,) = result.details
    assert detail["dataset_name"] == f"{source}_tpp_results"
    for name, value in result.metrics["tpp_metrics"].items():
        if name.startswith(("tpp_threshold_2_", "tpp_threshold_5_")):
            assert -1.0 <= value <= 1.0
        else:
            assert value is None  # not run, or more latents (100) than the SAE's 64
    assert set(result.unstructured[source]) == {"land", "sea", "sky"}
    png = plot_tpp({"standard": result}, tmp_path / "tpp.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert [result.metric(d) for d in TPP_HEADLINE] == [None, None]


def test_bad_inputs_say_what_to_do(tiny_data, tmp_path) -> None:  # noqa: F811 - the fixture
    one_column = _jsonl(tmp_path / "one.jsonl",
                        [{"text": f"t {i}", "label": "ab"[i % 2]} for i in range(12)])
    sae = random_sae("standard", 32, 64)
    with pytest.raises(ValueError, match="two label columns"):
        run_scr([sae], tiny_data, ScrConfig(dataset_names=[one_column]))
    with pytest.raises(ValueError, match="at least three classes"):
        run_tpp([sae], tiny_data, TppConfig(dataset_names=[one_column]))
    with pytest.raises(ValueError, match="use run_tpp"):
        run_scr([sae], tiny_data, TppConfig())
    two = _jsonl(tmp_path / "two.jsonl", two_label_rows())
    lookup = {two: [["sea", "moon"]]}
    with pytest.raises(ValueError, match="two different classes of 'topic'"):
        run_scr([sae], tiny_data, ScrConfig(dataset_names=[two], column1_vals_lookup=lookup,
                                            label_columns=["topic", "mood"]))
    transcoder: SAE = random_sae("transcoder", 32, 64)
    with pytest.raises(ValueError, match="not transcoders"):
        run_scr([transcoder], tiny_data, ScrConfig(dataset_names=[two],
                                                   label_columns=["topic", "mood"]))
    with pytest.raises(ValueError, match="n_values"):
        ScrConfig(n_values=[])
