"""The synthetic feature generator: its samples follow the configuration it was given (Zipf
firing rates, children only with parents, correlated groups co-firing, magnitudes, noise),
deterministically under a seed and in bounded chunks; bad settings are refused by name."""

from __future__ import annotations

import math
import re

import pytest
import torch

from saekit.evals import synthetic
from saekit.evals.synthetic import SyntheticFeatures

N = 40_000

#: Tiny matmuls on a shared machine: one thread is far faster.
pytestmark = pytest.mark.usefixtures("one_thread")


def fires(features: SyntheticFeatures, n: int = N, seed: int = 3) -> torch.Tensor:
    return features.sampler().sample(n, seed).features > 0


def binomial_tolerance(p: torch.Tensor, n: int, sigmas: float = 4.5) -> torch.Tensor:
    return sigmas * (p * (1 - p) / n).sqrt()


def test_firing_rates_follow_the_zipf_law_asked_for() -> None:
    features = SyntheticFeatures(d=32, n_features=60, firing_max=0.4, zipf_exponent=0.8)
    rates = fires(features).double().mean(0)
    ranks = torch.arange(1, 61, dtype=torch.float64)
    expected = 0.4 * ranks.pow(-0.8)
    assert ((rates - expected).abs() <= binomial_tolerance(expected, N)).all()
    # The log-log slope of measured rate against rank is the exponent.
    slope = torch.linalg.lstsq(
        torch.stack([ranks.log(), torch.ones(60, dtype=torch.float64)], 1),
        rates.log().unsqueeze(1),
    ).solution[0, 0]
    assert slope.item() == pytest.approx(-0.8, abs=0.05)


def test_exponent_zero_fires_every_feature_alike() -> None:
    rates = fires(SyntheticFeatures(d=8, n_features=10, zipf_exponent=0.0)).double().mean(0)
    expected = torch.full((10,), 0.25, dtype=torch.float64)
    assert ((rates - expected).abs() <= binomial_tolerance(expected, N)).all()


def test_children_fire_only_with_their_parent() -> None:
    features = SyntheticFeatures(
        d=32, n_features=20, n_parents=2, children_per_parent=3, child_firing=0.4,
        firing_max=0.5, zipf_exponent=0.0,
    )
    sampler = features.sampler()
    fired = fires(features)
    # Layout: roots 0..13 (parents 0 and 1), children 14..16 of parent 0, 17..19 of parent 1.
    assert sampler.parent.tolist() == [-1] * 14 + [0, 0, 0, 1, 1, 1]
    for child in range(14, 20):
        parent = int(sampler.parent[child])
        assert not (fired[:, child] & ~fired[:, parent]).any()
        given_parent = fired[fired[:, parent], child].double().mean().item()
        assert given_parent == pytest.approx(0.4, abs=0.02)
        assert fired[:, child].double().mean().item() == pytest.approx(0.2, abs=0.01)
    assert sampler.marginal_probabilities[14:].tolist() == pytest.approx([0.2] * 6)


def test_correlated_groups_co_fire_and_keep_their_rates() -> None:
    features = SyntheticFeatures(
        d=32, n_features=12, n_groups=2, group_size=3, group_correlation=0.9,
        firing_max=0.2, zipf_exponent=0.0,
    )
    sampler = features.sampler()
    assert sampler.group.tolist() == [0, 0, 0, 1, 1, 1] + [-1] * 6
    fired = fires(features).double()
    rates = fired.mean(0)
    expected = torch.full((12,), 0.2, dtype=torch.float64)
    assert ((rates - expected).abs() <= binomial_tolerance(expected, N)).all()

    def both(i: int, j: int) -> float:
        return (fired[:, i] * fired[:, j]).mean().item()

    # Independent features fire together at p^2 = 0.04; members of a group far more often.
    assert both(0, 1) > 0.12 and both(3, 5) > 0.12
    assert both(0, 3) == pytest.approx(0.04, abs=0.006)  # different groups
    assert both(7, 9) == pytest.approx(0.04, abs=0.006)  # no group


def test_noise_level_and_the_clean_part_are_as_configured() -> None:
    features = SyntheticFeatures(d=32, n_features=48, noise=0.05)
    sampler = features.sampler()
    batch = sampler.sample(20_000, seed=1)
    residual = batch.x - batch.features @ sampler.directions
    assert residual.std().item() == pytest.approx(0.05, rel=0.02)
    assert residual.mean().abs().item() < 2e-3
    clean = SyntheticFeatures(d=32, n_features=48).sampler().sample(1000, seed=1)
    assert torch.allclose(clean.x, clean.features @ sampler.directions, atol=1e-6)


@pytest.mark.parametrize(("magnitude", "spread"), [("uniform", 0.5), ("lognormal", 0.4)])
def test_magnitudes_have_the_mean_and_range_asked_for(magnitude: str, spread: float) -> None:
    features = SyntheticFeatures(d=16, n_features=8, magnitude=magnitude, magnitude_mean=2.0,
                                 magnitude_spread=spread, firing_max=0.5, zipf_exponent=0.0)
    values = features.sampler().sample(20_000, seed=2).features
    firing = values[values > 0]
    assert firing.mean().item() == pytest.approx(2.0, rel=0.02)
    if magnitude == "uniform":
        assert firing.min().item() >= 1.0 and firing.max().item() <= 3.0
    else:
        assert firing.log().std().item() == pytest.approx(0.4, rel=0.03)


def test_directions_are_unit_and_orthogonal_when_asked() -> None:
    orthogonal = SyntheticFeatures(d=20, n_features=20, directions="orthogonal").sampler()
    assert torch.allclose(orthogonal.directions @ orthogonal.directions.T, torch.eye(20),
                          atol=1e-5)
    rand = SyntheticFeatures(d=20, n_features=50).sampler()
    assert torch.allclose(rand.directions.norm(dim=1), torch.ones(50), atol=1e-6)


def test_the_same_seed_gives_the_same_samples_and_another_seed_does_not() -> None:
    features = SyntheticFeatures(d=16, n_features=32, noise=0.1, n_groups=1, group_size=4)
    a, b = features.sampler().sample(500, seed=5), features.sampler().sample(500, seed=5)
    assert torch.equal(a.x, b.x) and torch.equal(a.features, b.features)
    assert not torch.equal(a.x, features.sampler().sample(500, seed=6).x)
    other = SyntheticFeatures(d=16, n_features=32, seed=1).sampler()
    assert not torch.equal(other.directions, features.sampler().directions)
    streamed = list(features.sampler().batches(200, seed=5, n=500))
    assert [len(batch.x) for batch in streamed] == [200, 200, 100]


def test_large_draws_are_made_in_bounded_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    features = SyntheticFeatures(d=8, n_features=100)
    sampler = features.sampler()
    chunks: list[int] = []
    original = sampler._chunk

    def counted(m: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        chunks.append(m)
        return original(m, generator)

    monkeypatch.setattr(synthetic, "CHUNK_ELEMENTS", 1000)  # 10 rows of 100 features
    monkeypatch.setattr(sampler, "_chunk", counted)
    batch = sampler.sample(95, seed=0)
    assert chunks == [10] * 9 + [5]
    assert batch.x.shape == (95, 8) and batch.features.shape == (95, 100)
    assert torch.allclose(batch.x, batch.features @ sampler.directions, atol=1e-6)


def test_expected_l0_matches_the_sampled_l0() -> None:
    features = SyntheticFeatures(d=16, n_features=30, n_parents=2, children_per_parent=4)
    sampler = features.sampler()
    measured = fires(features).double().sum(1).mean().item()
    assert measured == pytest.approx(sampler.expected_l0, rel=0.03)
    assert math.isclose(sampler.expected_l0, float(sampler.marginal_probabilities.sum()))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"d": 0}, "d must be a whole number of at least 1"),
        ({"firing_max": 1.5}, "firing_max must be in (0, 1]"),
        ({"zipf_exponent": -1.0}, "zipf_exponent must be in [0, inf)"),
        ({"directions": "sphere"}, "directions 'sphere' is not one of random, orthogonal"),
        ({"directions": "orthogonal", "d": 8, "n_features": 9}, "do not fit in d=8"),
        ({"n_parents": 2}, "needs both n_parents and children_per_parent"),
        ({"n_groups": 1, "group_size": 1}, "at least 2 features"),
        ({"n_features": 10, "n_parents": 3, "children_per_parent": 3}, "need at least 12"),
        ({"magnitude_spread": 1.5}, "would make uniform magnitudes negative"),
        ({"noise": float("nan")}, "noise must be in [0, inf)"),
    ],
)
def test_bad_settings_are_refused_by_name(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        SyntheticFeatures(**settings)
