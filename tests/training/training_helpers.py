"""Tiny SAEs and training configs for the training tests."""

from __future__ import annotations

import torch

from saekit import SAE, SAEConfig
from saekit.training import TrainingConfig
from saekit.training.config import TOPK_ARCHITECTURES


def make_sae(architecture: str, d_in: int = 16, d_sae: int = 64, seed: int = 0, **fields) -> SAE:
    torch.manual_seed(seed)
    if architecture in TOPK_ARCHITECTURES:
        fields.setdefault("k", 4)
    if architecture == "matryoshka_batchtopk":
        fields.setdefault("matryoshka_widths", [d_sae // 4, d_sae])
    if "transcoder" in architecture:
        fields.setdefault("apply_b_dec_to_input", False)
    return SAE.from_config(SAEConfig(architecture, d_in=d_in, d_sae=d_sae, **fields))


def small_config(steps: int, batch_size: int = 256, **fields) -> TrainingConfig:
    fields.setdefault("lr", 3e-3)
    fields.setdefault("dead_after_tokens", batch_size * 50)
    return TrainingConfig(tokens=steps * batch_size, batch_size=batch_size, **fields)
