"""`saekit export neuronpedia`: the files follow the layout SAEDashboard's Neuronpedia runner
writes, and their numbers are the statistics' and the weights'.

The expected layout below is written from a reading of SAEDashboard's code (the
`to_dict` methods of the Neuronpedia dashboard batch, feature and activation classes in
sae_dashboard/neuronpedia/neuronpedia_dashboard.py; the runner's skipped_indexes.json in
neuronpedia_runner.py `record_skipped_features`) and of Neuronpedia's explanation row
(neuronpedia_utils/db_models/explanation.py), not from saekit's exporter.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from saekit import SAE
from saekit.analysis.collect import feature_statistics, unembedding
from saekit.analysis.explanations import Explanation, append_explanations
from saekit.analysis.stats import logit_effects
from saekit.cli import main
from saekit.errors import SaekitError
from saekit.evals.api import heldout_token_batches
from saekit.export import export_neuronpedia
from saekit.models import load_model
from saekit.models.tiny import TINY_TEXTS, tiny_gpt2, tiny_tokenizer

HOOK = "blocks.1.hook_resid_pre"
D_MODEL, D_SAE, VOCAB = 32, 24, 300
PER_BATCH = 10

# batch-N.json, top level (NeuronpediaDashboardBatch.to_dict).
BATCH_FIELDS = {"model_id": str, "layer": int, "sae_set": str, "sae_id_suffix": (str, type(None)),
                "features": list}
# One feature (NeuronpediaDashboardFeature.to_dict): every key, with the type of its value or
# of the items of its list.
FEATURE_FIELDS = {
    "feature_index": int,
    "neuron_alignment_indices": [int], "neuron_alignment_values": [float],
    "neuron_alignment_l1": [float],
    "correlated_neurons_indices": [int], "correlated_neurons_l1": [float],
    "correlated_neurons_pearson": [float],
    "correlated_features_indices": [int], "correlated_features_l1": [float],
    "correlated_features_pearson": [float],
    "neg_str": [str], "neg_values": [float], "pos_str": [str], "pos_values": [float],
    "frac_nonzero": float,
    "freq_hist_data_bar_values": [float], "freq_hist_data_bar_heights": [int],
    "logits_hist_data_bar_heights": [int], "logits_hist_data_bar_values": [float],
    "n_prompts_total": int, "n_tokens_in_prompt": int, "dataset": str,
    "decoder_weights_dist": [float],
    "activations": [dict],
    "vector": [float],
}
# One activation (NeuronpediaDashboardActivation.to_dict; the dfa_* keys are optional there).
ACTIVATION_FIELDS = {"bin_min": (int, float), "bin_max": (int, float),
                     "bin_contains": (int, float), "tokens": [str], "values": [(int, float)],
                     "qualifying_token_index": int}
# skipped_indexes.json (the runner's record_skipped_features; layer is a string there).
SKIPPED_FIELDS = {"model_id": str, "layer": str, "sae_set": str, "log_sparsity": (int, float),
                  "skipped_indexes": [int]}
# explanations/*.jsonl.gz rows (Neuronpedia's Explanation: required fields and the optional
# ones the export fills).
EXPLANATION_FIELDS = {"id": str, "modelId": str, "layer": str, "index": str, "description": str,
                      "authorId": str, "typeName": (str, type(None)),
                      "explanationModelName": (str, type(None)), "notes": (str, type(None)),
                      "createdAt": str}


def check_fields(record: dict, schema: dict, where: str) -> None:
    assert set(record) == set(schema), f"{where}: keys {sorted(set(record) ^ set(schema))}"
    for key, kind in schema.items():
        value = record[key]
        if isinstance(kind, list):
            assert isinstance(value, list), f"{where}.{key} is not a list"
            assert all(isinstance(v, kind[0]) and not isinstance(v, bool) for v in value), (
                f"{where}.{key} holds an item that is not {kind[0]}"
            )
        else:
            assert isinstance(value, kind), f"{where}.{key} is {type(value).__name__}"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tokenizer = tiny_tokenizer(VOCAB)
    backend = load_model(tiny_gpt2(VOCAB, d_model=D_MODEL), tokenizer=tokenizer)
    torch.manual_seed(0)
    sae = SAE.create("standard", D_MODEL, D_SAE)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn_like(sae.W_enc) / D_MODEL**0.5)
        sae.W_dec.copy_(torch.randn_like(sae.W_dec) / D_SAE**0.5)
        sae.b_enc.fill_(0.1)
        sae.b_enc[3] = -1e4  # never fires: must be skipped
    sae.cfg.metadata.hook_name = HOOK
    sae.cfg.metadata.model_name = "tiny-gpt2"
    batches = heldout_token_batches(tokenizer, 1500, dataset=list(TINY_TEXTS) * 10,
                                    context_size=24)
    stats = feature_statistics(sae, backend, batches, top_k=6)
    notes = {
        0: Explanation(0, "the letter e", {"detection": {"balanced_accuracy": 0.75}},
                       explainer_model="m", prompt_version="v1"),
        12: Explanation(12, "punctuation"),
    }
    out = tmp_path_factory.mktemp("np") / "export"
    export_neuronpedia(sae, out, stats=stats, model=backend, explanations=notes,
                       features_per_batch=PER_BATCH, creator_id="me", progress=False)
    return sae, backend, stats, out, notes


def batches(out: Path) -> list[dict]:
    files = sorted(out.glob("batch-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    return [json.loads(f.read_text()) for f in files]


def test_files_follow_the_dashboard_layout(world) -> None:
    sae, _, stats, out, _ = world
    data = batches(out)
    assert data, "no batch-N.json written"
    for n, batch in enumerate(data):
        check_fields(batch, BATCH_FIELDS, f"batch-{n}")
        assert (batch["model_id"], batch["layer"], batch["sae_set"]) == ("tiny-gpt2", 1, "saekit")
        assert len(batch["features"]) <= PER_BATCH
        for feature in batch["features"]:
            check_fields(feature, FEATURE_FIELDS, f"batch-{n} feature")
            for a in feature["activations"]:
                check_fields(a, ACTIVATION_FIELDS, f"feature {feature['feature_index']}")
                assert len(a["tokens"]) == len(a["values"])
                assert 0 <= a["qualifying_token_index"] < len(a["tokens"])
    skipped = json.loads((out / "skipped_indexes.json").read_text())
    check_fields(skipped, SKIPPED_FIELDS, "skipped_indexes.json")
    settings = json.loads((out / "run_settings.json").read_text())
    assert settings["n_features_at_a_time"] == PER_BATCH
    # Every latent once: the ones that fired in the batches, in order; the others skipped.
    fired = [i for i in range(D_SAE) if stats.fire_count[i] > 0]
    assert [f["feature_index"] for b in data for f in b["features"]] == fired
    assert skipped["skipped_indexes"] == [i for i in range(D_SAE) if i not in fired]
    assert 3 in skipped["skipped_indexes"]
    assert len(data) == math.ceil(len(fired) / PER_BATCH)


def features_by_index(out: Path) -> dict[int, dict]:
    return {f["feature_index"]: f for b in batches(out) for f in b["features"]}


def test_numbers_are_the_statistics_and_the_weights(world) -> None:
    sae, backend, stats, out, _ = world
    features = features_by_index(out)
    W_U = unembedding(backend)
    (top_ids, top_values), (bottom_ids, bottom_values) = logit_effects(sae.W_dec, W_U, n=10)
    decode = backend.tokenizer.decode
    for i, f in features.items():
        assert f["frac_nonzero"] == pytest.approx(int(stats.fire_count[i]) / stats.n_tokens)
        assert f["pos_values"] == pytest.approx(top_values[i].tolist(), abs=1e-4)
        assert f["neg_values"] == pytest.approx(bottom_values[i].tolist(), abs=1e-4)
        assert f["pos_str"] == [decode([t]) for t in top_ids[i].tolist()]
        assert f["neg_str"] == [decode([t]) for t in bottom_ids[i].tolist()]
        # The activation histogram counts every firing token.
        assert sum(f["freq_hist_data_bar_heights"]) == int(stats.fire_count[i])
        width = float(stats.hist_range[i]) / stats.hist_counts.shape[1]
        assert f["freq_hist_data_bar_values"][0] == pytest.approx(width / 2, abs=1e-4)
        # The logit histogram: numpy's 50 equal bins over the effects on the whole vocabulary.
        effect = (sae.W_dec[i].detach() @ W_U).double().numpy()
        heights, edges = np.histogram(effect, bins=50)
        assert sum(f["logits_hist_data_bar_heights"]) == VOCAB
        assert np.abs(np.array(f["logits_hist_data_bar_heights"]) - heights).sum() <= 2
        centres = (edges[:-1] + edges[1:]) / 2
        assert f["logits_hist_data_bar_values"] == pytest.approx(centres.tolist(), abs=1e-3)
        # Decoder alignment: the three largest entries of the decoder row.
        row = sae.W_dec[i].detach()
        assert f["neuron_alignment_indices"] == row.topk(3).indices.tolist()
        assert f["neuron_alignment_l1"][0] == pytest.approx(
            float(row.topk(3).values[0].abs() / row.abs().sum()), abs=1e-4
        )


def test_examples_are_the_top_and_interval_examples(world) -> None:
    _, backend, stats, out, _ = world
    decode = backend.tokenizer.decode
    for i, f in features_by_index(out).items():
        expected_top = stats.top_examples(i)
        top = [a for a in f["activations"] if a["bin_min"] == -1]
        assert len(top) == len(expected_top)
        for record, (value, tokens, acts) in zip(top, expected_top, strict=True):
            q = record["qualifying_token_index"]
            assert record["values"][q] == pytest.approx(value, abs=1e-4)
            assert record["tokens"][q] == decode([tokens[stats.left]])
            assert record["tokens"] == [decode([t]) for t in tokens if t >= 0]
            kept = [a for a, t in zip(acts, tokens, strict=True) if t >= 0]
            assert record["values"] == pytest.approx(kept, abs=1e-4)
            assert record["bin_max"] == pytest.approx(float(stats.max_act[i]), abs=1e-4)
        intervals = [a for a in f["activations"] if a["bin_min"] != -1]
        for record in intervals:  # each example lies in its interval
            value = record["values"][record["qualifying_token_index"]]
            assert record["bin_min"] - 1e-4 < value <= record["bin_max"] + 1e-4
            assert 0 < record["bin_contains"] <= f["frac_nonzero"] + 1e-9
        # Highest interval first, as SAEDashboard lists them.
        maxima = [r["bin_max"] for r in intervals]
        assert maxima == sorted(maxima, reverse=True)


def test_explanations_become_neuronpedia_rows(world) -> None:
    _, _, stats, out, notes = world
    rows = []
    for path in sorted((out / "explanations").glob("batch-*.jsonl.gz")):
        rows += [json.loads(line) for line in gzip.decompress(path.read_bytes()).splitlines()]
    explained = {i for i in notes if stats.fire_count[i] > 0}
    assert {int(r["index"]) for r in rows} == explained
    for row in rows:
        check_fields(row, EXPLANATION_FIELDS, "explanation row")
        assert row["description"] == notes[int(row["index"])].explanation
        assert row["layer"] == "1-saekit" and row["modelId"] == "tiny-gpt2"
        assert row["authorId"] == "me"
    first = next(r for r in rows if r["index"] == "0")
    assert first["notes"] == "detection.balanced_accuracy=0.75"
    assert first["explanationModelName"] == "m" and first["typeName"] == "v1"


def test_saved_statistics_and_an_explanations_file_give_the_same_files(world, tmp_path) -> None:
    sae, backend, stats, out, notes = world
    stats.save(tmp_path / "stats")
    append_explanations(tmp_path / "notes", notes.values())
    again = tmp_path / "again"
    export_neuronpedia(sae, again, stats=tmp_path / "stats", model=backend,
                       explanations=tmp_path / "notes", features_per_batch=PER_BATCH,
                       creator_id="me", progress=False)
    # Saved statistics keep activations to about 3 significant digits (FeatureStats.save),
    # which can move an example across an interval's edge: the interval examples are left
    # out of the comparison, everything else must agree.
    assert_close(without_intervals(batches(again)), without_intervals(batches(out)), rel=2e-3)


def without_intervals(data: list[dict]) -> list[dict]:
    for batch in data:
        for feature in batch["features"]:
            feature["activations"] = [a for a in feature["activations"] if a["bin_min"] == -1]
    return data


def assert_close(a: object, b: object, rel: float, where: str = "") -> None:
    """Same structure and strings; numbers equal to `rel` of the larger."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_close(a[key], b[key], rel, f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close(x, y, rel, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=rel, abs=2e-4), where
    else:
        assert a == b, where


def test_bad_inputs_are_refused_before_writing(world, tmp_path) -> None:
    sae, backend, stats, out, _ = world
    with pytest.raises(SaekitError, match="already holds files"):
        export_neuronpedia(sae, out, stats=stats, model=backend, progress=False)
    small = SAE.create("standard", D_MODEL, D_SAE + 1)
    small.cfg.metadata.hook_name = HOOK
    small.cfg.metadata.model_name = "tiny-gpt2"
    with pytest.raises(ValueError, match="describe 24 latents but the SAE has 25"):
        export_neuronpedia(small, tmp_path / "a", stats=stats, model=backend, progress=False)
    with pytest.raises(ValueError, match="latents \\[99\\]"):
        export_neuronpedia(sae, tmp_path / "b", stats=stats, model=backend,
                           explanations={99: Explanation(99, "x")}, progress=False)
    with pytest.raises(ValueError, match="not a Neuronpedia id"):
        export_neuronpedia(sae, tmp_path / "c", stats=stats, model=backend, sae_set="a b",
                           progress=False)
    assert not any(tmp_path.iterdir())


def test_cli_exports_a_saved_sae(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    sae = SAE.create("topk", 256, 32, k=4)
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_pre"
    sae.cfg.metadata.model_name = "bundled"
    sae.save(tmp_path / "sae")
    append_explanations(tmp_path / "sae", [Explanation(1, "something")])
    code = main(["--no-progress", "export", "neuronpedia", str(tmp_path / "sae"), "--out",
                 str(tmp_path / "np"), "--tokens", "512", "--model-id", "demo"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert printed.out.strip() == str((tmp_path / "np").resolve())
    data = batches(tmp_path / "np")
    assert data and data[0]["model_id"] == "demo" and data[0]["layer"] == 0
    assert (tmp_path / "np" / "explanations").is_dir() == any(
        f["feature_index"] == 1 for b in data for f in b["features"]
    )
    code = main(["export", "neuronpedia", str(tmp_path / "sae"), "--out", str(tmp_path / "np")])
    assert code == 2 and "already holds files" in capsys.readouterr().err
