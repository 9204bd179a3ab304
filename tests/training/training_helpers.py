"""Tiny SAEs and training configs for the training tests."""

from __future__ import annotations

import torch

from saekit import SAE, architecture_class
from saekit.training import TrainingSection


def make_sae(architecture: str, d_in: int = 16, d_sae: int = 64, seed: int = 0, **fields) -> SAE:
    """A fresh SAE with its architecture's defaults, k = 4 where the sparsity is k."""
    torch.manual_seed(seed)
    if architecture_class(architecture).sparsity_control == "k":
        fields.setdefault("k", 4)
    return SAE.create(architecture, d_in, d_sae, **fields)


def small_config(steps: int, batch_size: int = 256, **fields) -> TrainingSection:
    fields.setdefault("lr", 3e-3)
    fields.setdefault("dead_after_tokens", batch_size * 50)
    return TrainingSection(tokens=steps * batch_size, batch_size=batch_size, **fields)
