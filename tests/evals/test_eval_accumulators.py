"""Metric accumulators against hand-computed values and naive one-shot formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from saekit.evals.accumulators import (
    DownstreamAccumulator,
    ReconstructionAccumulator,
    SparsityAccumulator,
    score,
)


def test_reconstruction_metrics_by_hand() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    recon = torch.tensor([[1.0, 1.0], [2.0, 4.0]])
    acc = ReconstructionAccumulator()
    acc.update(x, recon)
    stats = acc.result()
    # errors (0, 1) and (1, 0): squared norms 1 and 1
    assert stats.mse == pytest.approx(1.0)
    # mean (2, 3); deviations (-1, -1), (1, 1): variance 2 -> EV = 1 - 1/2
    assert stats.explained_variance == pytest.approx(0.5)
    assert stats.cos_sim == pytest.approx((3 / math.sqrt(10) + 22 / (5 * math.sqrt(20))) / 2)
    assert stats.l2_ratio == pytest.approx((math.sqrt(2 / 5) + math.sqrt(20) / 5) / 2)
    # E||x^||^2 = (2 + 20) / 2, E<x, x^> = (3 + 22) / 2
    assert stats.relative_reconstruction_bias == pytest.approx(11 / 12.5)
    assert stats.n_tokens == 2


def test_explained_variance_is_about_the_mean_not_zero() -> None:
    # Residual-stream-like data: a large shared offset plus zero-mean noise. A "reconstruction"
    # that outputs the mean for every token explains none of the token-to-token variation, so
    # the right explained variance is exactly 0 (as R^2 of a constant predictor is).
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(400, 8, generator=gen, dtype=torch.float64)
    noise -= noise.mean(dim=0)
    offset = torch.full((8,), 10.0, dtype=torch.float64)
    x = offset + noise
    recon = offset.expand_as(x)
    acc = ReconstructionAccumulator()
    acc.update(x, recon)
    ours = acc.result().explained_variance
    about_zero = 1 - float((x - recon).pow(2).sum(-1).mean()) / float(x.pow(2).sum(-1).mean())
    assert ours == pytest.approx(0.0, abs=1e-12)
    assert about_zero > 0.9  # the old formula calls a useless reconstruction excellent
    # And a perfect reconstruction scores 1 under ours.
    exact = ReconstructionAccumulator()
    exact.update(x, x.clone())
    assert exact.result().explained_variance == 1.0


def test_batches_equal_one_pass_against_numpy() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(loc=3.0, scale=0.5, size=(103, 6))
    recon = x + rng.normal(scale=0.2, size=x.shape)
    acc = ReconstructionAccumulator()
    for lo, hi in [(0, 1), (1, 40), (40, 40), (40, 103)]:
        acc.update(torch.from_numpy(x[lo:hi]).float(), torch.from_numpy(recon[lo:hi]).float())
    stats = acc.result()
    x32 = x.astype(np.float32).astype(np.float64)
    r32 = recon.astype(np.float32).astype(np.float64)
    err = ((x32 - r32) ** 2).sum(1).mean()
    var = ((x32 - x32.mean(0)) ** 2).sum(1).mean()
    assert stats.n_tokens == 103
    assert stats.mse == pytest.approx(err, rel=1e-12)
    assert stats.explained_variance == pytest.approx(1 - err / var, rel=1e-10)
    cos = (x32 * r32).sum(1) / np.linalg.norm(x32, axis=1) / np.linalg.norm(r32, axis=1)
    assert stats.cos_sim == pytest.approx(cos.mean(), rel=1e-12)
    ratio = np.linalg.norm(r32, axis=1) / np.linalg.norm(x32, axis=1)
    assert stats.l2_ratio == pytest.approx(ratio.mean(), rel=1e-12)
    rrb = (r32**2).sum(1).mean() / (x32 * r32).sum(1).mean()
    assert stats.relative_reconstruction_bias == pytest.approx(rrb, rel=1e-12)


def test_variance_survives_a_large_mean() -> None:
    # A mean 1e7 times the spread: E||x||^2 - ||E x||^2 loses every digit even in float64.
    gen = torch.Generator().manual_seed(2)
    noise = torch.randn(1000, 4, generator=gen, dtype=torch.float64)
    x = 1e7 + noise
    acc = ReconstructionAccumulator()
    for chunk in x.split(64):
        acc.update(chunk, chunk)
    expected = float((x - x.mean(0)).pow(2).sum(-1).mean())
    assert acc.total_variance == pytest.approx(expected, rel=1e-6)


def test_sparsity_metrics_by_hand() -> None:
    latents = torch.tensor([[0.0, 2.0, 0.0], [1.0, 3.0, 0.0], [0.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    acc = SparsityAccumulator(d_sae=3)
    acc.update(latents[:1])
    acc.update(latents[1:])
    stats = acc.result()
    assert stats.l0 == pytest.approx(1.0)  # (1 + 2 + 0 + 1) / 4
    assert stats.l1 == pytest.approx(2.75)  # (2 + 4 + 0 + 5) / 4
    assert stats.firing_frequency.tolist() == [0.25, 0.75, 0.0]
    assert stats.dead_fraction == pytest.approx(1 / 3)
    assert stats.dense_fraction == pytest.approx(2 / 3)  # latents 0 and 1 fire on > 10%
    assert stats.mean_activation_when_firing.tolist() == pytest.approx([1.0, 10 / 3, 0.0])
    assert stats.max_activation.tolist() == [1.0, 5.0, 0.0]


def test_dense_threshold_is_strictly_more_than_ten_percent() -> None:
    latents = torch.zeros(10, 2)
    latents[0, 0] = 1.0  # exactly 10%: not dense
    latents[:2, 1] = 1.0  # 20%: dense
    acc = SparsityAccumulator(d_sae=2)
    acc.update(latents)
    assert acc.result().dense_fraction == 0.5


def test_downstream_scores_by_hand() -> None:
    acc = DownstreamAccumulator()
    acc.update(
        ce_clean=torch.tensor([2.0, 3.0]),
        ce_sae=torch.tensor([2.5, 3.5]),
        ce_ablation=torch.tensor([6.0, 8.0]),
        kl_sae=torch.tensor([0.1, 0.3]),
        kl_ablation=torch.tensor([1.0, 3.0]),
    )
    acc.update(
        ce_clean=torch.tensor([1.0]),
        ce_sae=torch.tensor([1.0]),
        ce_ablation=torch.tensor([4.0]),
        kl_sae=torch.tensor([0.2]),
        kl_ablation=torch.tensor([2.0]),
    )
    stats = acc.result()
    assert stats.ce_loss_without_sae == pytest.approx(2.0)
    assert stats.ce_loss_with_sae == pytest.approx(7 / 3)
    assert stats.ce_loss_with_ablation == pytest.approx(6.0)
    assert stats.ce_loss_score == pytest.approx((6 - 7 / 3) / (6 - 2))
    assert stats.kl_div_with_sae == pytest.approx(0.2)
    assert stats.kl_div_with_ablation == pytest.approx(2.0)
    assert stats.kl_div_score == pytest.approx(0.9)


def test_score_edges() -> None:
    assert score(5.0, 5.0, 1.0) == 0.0
    assert score(5.0, 1.0, 1.0) == 1.0
    assert math.isnan(score(1.0, 1.0, 1.0))


def test_empty_and_misshapen_input_errors() -> None:
    with pytest.raises(ValueError, match="no tokens"):
        ReconstructionAccumulator().result()
    with pytest.raises(ValueError, match="same shape"):
        ReconstructionAccumulator().update(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\[tokens, 3\]"):
        SparsityAccumulator(3).update(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="equal length"):
        z = torch.zeros(2)
        DownstreamAccumulator().update(z, z, z, z, torch.zeros(3))
