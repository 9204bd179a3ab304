"""--target-l0: the controller lands the held-out L0 within 10% of the target."""

from __future__ import annotations

import pytest
import torch
from training_helpers import make_sae, small_config

from saekit.training import SAEJob, Trainer
from saekit.training.synthetic import SparseFeatureStream


def held_out_l0(architecture: str, target: float, steps: int = 1000) -> float:
    stream = SparseFeatureStream(16, 32, 256, p_min=0.05, p_max=0.3, offset=1.0)
    cfg = small_config(steps, target_l0=target, sparsity_coefficient=0.1, lr_schedule="linear")
    trained = Trainer(SAEJob(make_sae(architecture), cfg), stream).fit().saes["sae"]
    with torch.no_grad():
        latents = trained.encode(stream.held_out(4096))
    return float((latents != 0).sum(dim=-1).float().mean())


def test_standard_sae_lands_on_target_l0() -> None:
    assert held_out_l0("standard", 4) == pytest.approx(4, rel=0.10)


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "gated"])
@pytest.mark.parametrize("target", [4, 8])
def test_every_coefficient_architecture_lands_on_target_l0(architecture: str, target: int) -> None:
    assert held_out_l0(architecture, target) == pytest.approx(target, rel=0.10)
