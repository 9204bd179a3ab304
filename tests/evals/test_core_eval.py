"""The core evaluation's SAEBench statistics, against hand computations."""

from __future__ import annotations

import json

import pytest
import torch
from sae_factory import random_sae

from saekit import SAE
from saekit.evals import core
from saekit.evals.accumulators import ReconstructionAccumulator, SparsityAccumulator
from saekit.evals.core import core_result, latent_weight_statistics, max_cosine_to_others
from saekit.evals.metrics import EvalMetrics
from saekit.evals.results import SAEBENCH_FIELDS, EvalResult, write_saebench_json

# Categories and metric names of SAEBench's core output schema
# (sae_bench/evals/core/eval_output_schema_core.json).
SAEBENCH_CORE = {
    "model_behavior_preservation": {"kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"},
    "model_performance_preservation": {
        "ce_loss_score", "ce_loss_with_ablation", "ce_loss_with_sae", "ce_loss_without_sae",
    },
    "reconstruction_quality": {"explained_variance", "explained_variance_legacy", "mse", "cossim"},
    "shrinkage": {"l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"},
    "sparsity": {"l0", "l1"},
    "token_stats": {"total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance"},
    "misc_metrics": {
        "freq_over_1_percent", "freq_over_10_percent", "normalized_freq_over_1_percent",
        "normalized_freq_over_10_percent", "average_max_encoder_cosine_sim",
        "average_max_decoder_cosine_sim", "frac_alive",
    },
}
SAEBENCH_CORE_FEATURE = {
    "index", "feature_density", "consistent_activation_heuristic", "encoder_bias",
    "encoder_norm", "encoder_decoder_cosine_sim", "max_decoder_cosine_sim",
    "max_encoder_cosine_sim",
}


def test_max_cosine_to_others_by_hand() -> None:
    rows = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, -2.0]])
    got = max_cosine_to_others(rows)
    half = 2**-0.5
    assert got.tolist() == pytest.approx([half, half, 0.0], abs=1e-6)


def test_max_cosine_blocks_agree_with_the_full_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    rows = torch.randn(50, 6)
    unit = torch.nn.functional.normalize(rows, dim=1)
    full = unit @ unit.T
    full.fill_diagonal_(float("-inf"))
    monkeypatch.setattr(core, "_BLOCK", 7)  # blocks that do not divide the row count
    assert torch.allclose(max_cosine_to_others(rows), full.max(dim=1).values, atol=1e-6)


def test_weight_statistics_of_a_hand_made_sae() -> None:
    sae = SAE.create("standard", 2, 3)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 3.0], [0.0, 2.0, 4.0]]))  # columns = latents
        sae.W_dec.copy_(torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, -1.0]]))
        sae.b_enc.copy_(torch.tensor([0.5, -0.5, 0.0]))
    stats = latent_weight_statistics(sae)
    assert stats["encoder_norm"].tolist() == pytest.approx([1.0, 2.0, 5.0])
    assert stats["decoder_norm"].tolist() == pytest.approx([2.0, 2**0.5, 1.0])
    assert stats["encoder_bias"].tolist() == [0.5, -0.5, 0.0]
    # cos(enc, dec) per latent: (1,0)/(2,0) = 1, (0,2)/(1,1) = 1/sqrt2, (3,4)/(0,-1) = -4/5.
    assert stats["encoder_decoder_cosine_sim"].tolist() == pytest.approx([1, 2**-0.5, -0.8])
    # Decoder rows (1,0), (1,1)/sqrt2, (0,-1): best partner cosines 1/sqrt2, 1/sqrt2, 0.
    assert stats["max_decoder_cosine_sim"].tolist() == pytest.approx([2**-0.5, 2**-0.5, 0.0])


def test_transcoder_has_no_encoder_decoder_cosine() -> None:
    sae = random_sae("transcoder", d_in=4, d_sae=6)  # d_out = 7: the cosine is undefined
    stats = latent_weight_statistics(sae)
    assert stats["encoder_decoder_cosine_sim"] is None
    assert stats["encoder_norm"].shape == (6,)


def test_norm_and_sequence_accumulators_by_hand() -> None:
    acc = ReconstructionAccumulator()
    acc.update(torch.tensor([[3.0, 4.0], [0.0, 1.0]]), torch.tensor([[0.0, 2.0], [0.0, 0.5]]))
    stats = acc.result()
    assert stats.l2_norm_in == pytest.approx((5 + 1) / 2)
    assert stats.l2_norm_out == pytest.approx((2 + 0.5) / 2)
    sparsity = SparsityAccumulator(3)
    latents = torch.tensor(
        [[[1.0, 0.0, 0.0], [2.0, 0.0, 5.0]], [[0.0, 0.0, 0.0], [1.0, 0.0, 7.0]]]
    )  # [batch 2, pos 2, d_sae 3]
    mask = torch.tensor([[True, True], [True, False]])  # the last token is not evaluated
    sparsity.update(latents[mask])
    sparsity.count_sequences(latents, mask)
    # Latent 0 fires in sequence 1 only at the masked position, so it counts once.
    assert sparsity.result().sequences_fired.tolist() == [1, 0, 1]


def _metrics(freq: list[float], sequences: list[int], n_tokens: int) -> EvalMetrics:
    d = len(freq)
    return EvalMetrics(
        n_tokens=n_tokens, l0=sum(freq), l1=1.0, mse=0.1, explained_variance=0.9, cos_sim=0.9,
        l2_ratio=0.95, relative_reconstruction_bias=1.0, dead_fraction=0.0,
        dense_fraction=0.0, firing_frequency=torch.tensor(freq, dtype=torch.float64),
        mean_activation_when_firing=torch.zeros(d), max_activation=torch.zeros(d),
        l2_norm_in=2.0, l2_norm_out=1.9, sequences_fired=torch.tensor(sequences),
    )


def test_core_result_frequency_metrics_by_hand(tmp_path) -> None:
    sae = random_sae("standard", d_in=4, d_sae=4)
    # Densities 0.2, 0.05, 0.005, 0: two latents over 1%, one over 10%, three alive.
    m = _metrics([0.2, 0.05, 0.005, 0.0], [10, 25, 5, 0], n_tokens=1000)
    result = core_result(sae, m)
    misc = result.metrics["misc_metrics"]
    assert misc["freq_over_1_percent"] == pytest.approx(0.5)
    assert misc["freq_over_10_percent"] == pytest.approx(0.25)
    assert misc["normalized_freq_over_1_percent"] == pytest.approx(0.25 / 0.255)
    assert misc["normalized_freq_over_10_percent"] == pytest.approx(0.2 / 0.255)
    assert misc["frac_alive"] == pytest.approx(0.75)
    # 200 firings over 10 sequences = 20 per sequence; 50 over 25 = 2; 5 over 5 = 1.
    assert [row["consistent_activation_heuristic"] for row in result.details] == pytest.approx(
        [20.0, 2.0, 1.0, 0.0]
    )
    assert result.metrics["shrinkage"]["l2_norm_in"] == 2.0

    # The written file carries every field of SAEBench's schema, in its categories.
    path = write_saebench_json(result, sae, tmp_path / "core" / "x_eval_results.json")
    record = json.loads(path.read_text())
    assert set(record) == set(SAEBENCH_FIELDS)
    assert {k: set(v) for k, v in record["eval_result_metrics"].items()} == SAEBENCH_CORE
    assert SAEBENCH_CORE_FEATURE <= set(record["eval_result_details"][0])
    assert record["sae_cfg_dict"]["d_sae"] == 4


def test_results_refuse_nested_metrics_and_write_nan_as_null(tmp_path) -> None:
    with pytest.raises(ValueError, match="flat numbers"):
        EvalResult("x", {}, {"group": {"nested": [1, 2]}})  # type: ignore[dict-item]
    sae = random_sae("topk", d_in=4, d_sae=4, k=2)
    result = EvalResult("x", {"seed": 0}, {"group": {"value": float("nan")}})
    record = json.loads(write_saebench_json(result, sae, tmp_path / "r.json").read_text())
    assert record["eval_result_metrics"] == {"group": {"value": None}}
