"""Learning-rate and sparsity schedules, the L0 controller, b_dec initialisation, decoder norms."""

from __future__ import annotations

import math

import pytest
import torch
from training_helpers import make_sae

from saekit.training.config import TrainingSection
from saekit.training.init import (
    geometric_median,
    initialize_b_dec,
    normalize_decoder_rows,
    remove_parallel_gradient,
)
from saekit.training.schedules import L0Controller, lr_at, sparsity_warmup_factor


def test_constant_schedule_with_warmup_rises_linearly_then_holds() -> None:
    cfg = TrainingSection(tokens=1000, batch_size=10, lr=1.0, lr_warmup_tokens=90)
    assert lr_at(cfg, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 40) == pytest.approx(0.5)
    assert lr_at(cfg, 80) == pytest.approx(0.9)
    assert lr_at(cfg, 90) == 1.0
    assert lr_at(cfg, 990) == 1.0


def test_cosine_schedule_falls_from_peak_to_zero() -> None:
    cfg = TrainingSection(tokens=1000, batch_size=10, lr=2.0, lr_schedule="cosine")
    assert lr_at(cfg, 0) == pytest.approx(2.0)
    assert lr_at(cfg, 500) == pytest.approx(1.0)
    assert lr_at(cfg, 1000) == pytest.approx(0.0, abs=1e-12)
    values = [lr_at(cfg, t) for t in range(0, 1000, 10)]
    assert values == sorted(values, reverse=True)


def test_linear_schedule_decays_to_zero_over_the_last_fraction() -> None:
    cfg = TrainingSection(
        tokens=1000, batch_size=10, lr=1.0, lr_schedule="linear", lr_decay_fraction=0.2
    )
    assert lr_at(cfg, 799) == 1.0
    assert lr_at(cfg, 900) == pytest.approx(0.5)
    assert lr_at(cfg, 990) == pytest.approx(0.05)
    assert lr_at(cfg, 1000) == 0.0


def test_sparsity_warmup_reaches_one_and_stays() -> None:
    cfg = TrainingSection(tokens=1000, batch_size=10, sparsity_warmup_tokens=100)
    assert sparsity_warmup_factor(cfg, 0) == pytest.approx(0.1)
    assert sparsity_warmup_factor(cfg, 40) == pytest.approx(0.5)
    assert sparsity_warmup_factor(cfg, 500) == 1.0
    assert sparsity_warmup_factor(TrainingSection(tokens=10, batch_size=10), 0) == 1.0


def test_controller_raises_lambda_when_l0_is_high_and_lowers_it_when_low() -> None:
    high = L0Controller(target=10, initial=1.0, gain=0.1)
    for _ in range(20):
        high.update(100.0)
    assert high.coefficient > 2.0
    low = L0Controller(target=10, initial=1.0, gain=0.1)
    for _ in range(20):
        low.update(1.0)
    assert low.coefficient < 0.5
    # Each step moves log(lambda) by at most max_step, whatever the error.
    assert math.log(high.coefficient) <= 20 * L0Controller.max_step + 1e-9


def test_controller_reference_ramps_from_the_first_l0_to_the_target() -> None:
    ctl = L0Controller(target=9, initial=1.0, gain=0.1, ramp_steps=10)
    ctl.update(99.0)
    assert ctl.reference() == pytest.approx(math.exp(0.9 * math.log(100) + 0.1 * math.log(10)) - 1)
    for _ in range(9):
        ctl.update(99.0)
    assert ctl.reference() == 9


def test_balanced_start_rescales_lambda_after_the_first_step() -> None:
    # The first step ran at lambda 5 with sparsity terms 50x the reconstruction loss: the
    # balanced lambda is 5 / 50; the controller's own first move (up, L0 far above target)
    # is at most max_step on top.
    ctl = L0Controller(target=10, initial=5.0, gain=0.1, balance_start=True)
    after = ctl.update(100.0, sparsity_share=50.0)
    assert 0.1 <= after <= 0.1 * math.exp(L0Controller.max_step) + 1e-12
    assert ctl.update(100.0, sparsity_share=1.0) >= after  # only the first step rebalances
    plain = L0Controller(target=10, initial=5.0, gain=0.1)
    assert plain.update(100.0, sparsity_share=50.0) >= 5.0


def test_controller_state_round_trips() -> None:
    ctl = L0Controller(target=5, initial=0.3, gain=0.05, ramp_steps=7, balance_start=True)
    for l0 in (40.0, 30.0, 20.0):
        ctl.update(l0)
    copy = L0Controller(target=1, initial=1.0, gain=1.0)
    copy.load_state_dict(ctl.state_dict())
    assert copy.update(12.0) == ctl.update(12.0)


def test_geometric_median_ignores_a_far_outlier() -> None:
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1000.0, 1000.0]])
    median = geometric_median(points)
    # The mean is dragged to ~200; the median stays inside the unit square.
    assert points.mean(0)[0] > 100
    assert 0.0 < median[0] < 1.0 and 0.0 < median[1] < 1.0
    symmetric = torch.tensor([[1.0, 2.0], [3.0, 2.0], [2.0, 1.0], [2.0, 3.0]])
    torch.testing.assert_close(geometric_median(symmetric), torch.tensor([2.0, 2.0]).double())


@pytest.mark.parametrize("mode", ["zeros", "mean", "geometric_median"])
def test_b_dec_initialisation(mode: str) -> None:
    sae = make_sae("standard", d_in=4)
    sample = torch.randn(200, 4) + torch.tensor([5.0, -3.0, 0.0, 2.0])
    initialize_b_dec(sae, mode, sample)
    expected = {
        "zeros": torch.zeros(4),
        "mean": sample.mean(0),
        "geometric_median": geometric_median(sample).float(),
    }[mode]
    torch.testing.assert_close(sae.b_dec.detach(), expected, atol=1e-5, rtol=0)


def test_parallel_gradient_removed_and_rows_normalised() -> None:
    sae = make_sae("topk", d_in=6, d_sae=10)
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    remove_parallel_gradient(sae)
    dots = (sae.W_dec.grad * sae.W_dec).sum(dim=1)
    torch.testing.assert_close(dots, torch.zeros(10), atol=1e-6, rtol=0)
    normalize_decoder_rows(sae)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(10))


def test_controller_does_not_lower_lambda_far_above_the_target() -> None:
    """An L0 falling fast from far above the target (a fresh SAE learning to reconstruct)
    lowers lambda under a plain trend-predicting controller; far above the target it holds."""
    ctl = L0Controller(target=10, initial=1.0, gain=0.1, ramp_steps=100)
    for l0 in range(2000, 200, -100):  # 9x to 20x the target, falling 5% a step
        ctl.update(float(l0))
        assert ctl.coefficient >= 1.0
    near = L0Controller(target=10, initial=1.0, gain=0.1)
    for l0 in (15.0, 12.0, 8.0, 5.0, 3.0):  # within 2x and falling past the target
        near.update(l0)
    assert near.coefficient < 1.0


def test_controller_does_not_raise_lambda_when_sparsity_already_dominates() -> None:
    """When the sparsity terms are already far larger than the reconstruction loss, a larger
    lambda cannot speed Adam up; the controller holds instead of winding up."""
    ctl = L0Controller(target=10, initial=1.0, gain=0.1)
    for _ in range(50):
        ctl.update(15.0, sparsity_share=1e4)
    assert ctl.coefficient == 1.0
    for _ in range(50):
        ctl.update(15.0, sparsity_share=1.0)
    assert ctl.coefficient > 1.0
    for _ in range(50):
        ctl.update(2.0, sparsity_share=1e4)  # lowering stays allowed
    assert ctl.coefficient < 1.0


def test_controller_raises_lambda_for_a_noisy_l0_above_the_target() -> None:
    # A batch L0 that swings by a quarter around 37 (target 32), with upward spikes, as with
    # latents lifted after every step: lambda must rise. With the trend over one step, each
    # step was thrown to its bound, which cut the spikes and not their decay, and lambda
    # ended at 2.2 on this series.
    rng = torch.Generator().manual_seed(0)
    noise = torch.randn(400, generator=rng, dtype=torch.float64)
    controller = L0Controller(32, 2.0, 0.03)
    for value in (37.0 * torch.exp(0.25 * noise)).tolist():
        controller.update(value, 20.0)
    assert controller.coefficient > 4.0
    # The same series shifted below the target lowers it.
    controller = L0Controller(32, 2.0, 0.03)
    for value in (27.0 * torch.exp(0.25 * noise)).tolist():
        controller.update(value, 20.0)
    assert controller.coefficient < 2.0
