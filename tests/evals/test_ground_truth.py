"""Recovery scores against planted ground truth: MCC of an oracle (and of a permuted oracle)
is 1, a random SAE's is low; MCC, uniqueness, F1 and shrinkage equal hand computations on
tiny cases; a topk SAE trained for a second recovers the features; results in SAEBench's
layout and the plot."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from saekit import SAE
from saekit.evals.ground_truth import (
    EVAL_TYPE_ID,
    HEADLINE,
    SyntheticConfig,
    detection_scores,
    mcc,
    oracle_sae,
    plot_synthetic,
    recovery_scores,
    synthetic_result,
    uniqueness,
)
from saekit.evals.synthetic import SyntheticFeatures
from saekit.training.synthetic import run_synthetic

#: Tiny matmuls on a shared machine: one thread is far faster.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sampler():  # noqa: ANN201 - FeatureSampler
    return SyntheticFeatures(d=24, n_features=24, directions="orthogonal").sampler()


def test_mcc_of_an_oracle_is_one_and_of_a_permuted_oracle_is_one(sampler) -> None:
    truth = sampler.directions
    assert mcc(truth, truth) == pytest.approx(1.0, abs=1e-6)
    permutation = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    signs = torch.where(torch.arange(24) % 2 == 0, 1.0, -1.0).unsqueeze(1)
    assert mcc(3.0 * signs * truth[permutation], truth) == pytest.approx(1.0, abs=1e-6)
    scores = recovery_scores(oracle_sae(sampler), sampler, 4000, seed=1, progress=False)
    assert scores.mcc == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(scores.matched_latents, scores.matched_features)


def test_a_random_dictionary_scores_low(sampler) -> None:
    torch.manual_seed(0)
    assert mcc(torch.randn(24, 24), sampler.directions) < 0.45


def test_mcc_is_the_mean_matched_cosine_by_hand() -> None:
    truth = torch.eye(2)
    c30 = math.cos(math.pi / 6)
    latents = torch.tensor([[c30, 0.5], [0.0, 1.0]])
    # Pairs (0->e1, 1->e2) sum to c30 + 1; (0->e2, 1->e1) to 0.5 + 0: Hungarian takes the first.
    assert mcc(latents, truth) == pytest.approx((c30 + 1) / 2, abs=1e-6)
    # A third latent along -e1 displaces latent 0 from e1 (|cos| 1 beats c30).
    wider = torch.cat([latents, torch.tensor([[-2.0, 0.0]])])
    assert mcc(wider, truth) == pytest.approx(1.0, abs=1e-6)


def test_uniqueness_and_duplicated_features_by_hand() -> None:
    truth = torch.eye(3)
    latents = torch.tensor([[1.0, 0.1, 0.0], [0.9, 0.0, 0.2], [0.0, 1.0, 0.0], [0.0, 0.8, 0.1]])
    # Best matches: features 0, 0, 1, 1: two distinct among four latents; both duplicated.
    assert uniqueness(latents, truth) == (0.5, 2)
    assert uniqueness(truth, truth) == (1.0, 0)


def test_detection_scores_by_hand() -> None:
    latent = torch.tensor([[1, 1], [1, 0], [0, 0], [1, 0]], dtype=torch.bool)
    feature = torch.tensor([[1, 0], [0, 0], [1, 0], [1, 0]], dtype=torch.bool)
    precision, recall, f1 = detection_scores(latent, feature)
    # Column 0: TP 2, predicted 3, actual 3. Column 1: fires once, its feature never: 0.
    assert precision.tolist() == pytest.approx([2 / 3, 0.0])
    assert recall.tolist() == pytest.approx([2 / 3, 0.0])
    assert f1.tolist() == pytest.approx([2 / 3, 0.0])


def test_an_oracle_detects_every_feature_and_does_not_shrink(sampler) -> None:
    scores = recovery_scores(oracle_sae(sampler), sampler, 4000, seed=1, progress=False)
    assert scores.f1 == pytest.approx(1.0) and scores.precision == pytest.approx(1.0)
    assert scores.uniqueness == 1.0 and scores.duplicated_features == 0
    assert scores.l2_ratio == pytest.approx(1.0, abs=1e-4)
    assert scores.explained_variance == pytest.approx(1.0, abs=1e-6)
    assert scores.l0 == pytest.approx(scores.true_l0)
    # Samples where nothing fires are left out, so the true L0 is E[L0 | L0 > 0].
    none_fire = float((1 - sampler.marginal_probabilities).prod())
    assert scores.true_l0 == pytest.approx(sampler.expected_l0 / (1 - none_fire), rel=0.05)


def test_shrinkage_and_f1_against_planted_faults(sampler) -> None:
    sae = oracle_sae(sampler)
    with torch.no_grad():
        sae.W_dec.mul_(0.5)  # every reconstruction half as long
        sae.W_enc[:, [0, 1]] = sae.W_enc[:, [1, 0]]  # latent 0 reads feature 1 and back
    scores = recovery_scores(sae, sampler, 4000, seed=1, progress=False)
    assert scores.mcc == pytest.approx(1.0, abs=1e-6)  # decoders untouched in direction
    assert scores.l2_ratio == pytest.approx(0.5, abs=1e-4)
    # Pairs 0 and 1 score as detectors of each other's feature, computed here directly.
    truth = sampler.sample(4000, 1).features > 0
    expected = detection_scores(truth[:, [1, 0]], truth[:, [0, 1]])[2]
    assert scores.pair_f1[:2].tolist() == pytest.approx(expected.tolist())
    assert scores.pair_f1[2:].tolist() == pytest.approx([1.0] * 22)
    assert scores.f1 == pytest.approx((float(expected.sum()) + 22) / 24)


def test_a_small_topk_trained_on_the_features_recovers_them() -> None:
    features = SyntheticFeatures(d=16, n_features=16, directions="orthogonal", firing_max=0.3)
    config = SyntheticConfig(features=features, d_sae=32, training_tokens=40_000,
                             batch_size=256, lr=3e-3, eval_samples=4000)
    run = run_synthetic(config, progress=False)
    scores = run.scores["topk"]
    assert scores.mcc >= 0.9
    assert scores.l0 == pytest.approx(round(run.sampler.expected_l0))  # k = expected L0
    assert run.saes["topk"].cfg.metadata.model_name == "synthetic"
    torch.manual_seed(0)
    untrained = recovery_scores(SAE.create("topk", 16, 32, k=2), run.sampler, 4000,
                                progress=False)
    assert untrained.mcc < scores.mcc - 0.2


def test_results_are_in_saebench_layout_and_plot(sampler, tmp_path: Path) -> None:
    config = SyntheticConfig(features=sampler.config)
    oracle = recovery_scores(oracle_sae(sampler), sampler, 2000, seed=1, progress=False)
    torch.manual_seed(0)
    noisy = recovery_scores(SAE.create("topk", 24, 24, k=3), sampler, 2000, progress=False)
    results = {
        "oracle": synthetic_result(oracle, config), "random": synthetic_result(noisy, config),
    }
    result = results["oracle"]
    assert result.eval_type_id == EVAL_TYPE_ID
    assert result.eval_config["features"]["d"] == 24
    for name in HEADLINE:
        assert isinstance(result.metric(name), float)
    assert result.metric("recovery.mcc") == pytest.approx(1.0, abs=1e-6)
    assert len(result.details) == 24 and result.details[0]["cosine"] == pytest.approx(1.0)
    path = plot_synthetic(results, tmp_path / "plot.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_mismatched_sae_and_bad_configs_are_refused(sampler) -> None:
    with pytest.raises(ValueError, match="d_in=8, but the synthetic activations have d=24"):
        recovery_scores(SAE.create("standard", 8, 16), sampler, 100, progress=False)
    with pytest.raises(ValueError, match="unknown SAE architecture 'topkk'"):
        SyntheticConfig(architectures=["topkk"])
    with pytest.raises(ValueError, match="is a transcoder"):
        SyntheticConfig(architectures=["transcoder"])
    with pytest.raises(ValueError, match="repeat a name"):
        SyntheticConfig(architectures=["topk", "topk"])
    with pytest.raises(ValueError, match="batch_size=4096 is larger than training_tokens=100"):
        SyntheticConfig(training_tokens=100, batch_size=4096)
