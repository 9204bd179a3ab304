"""Helpers for the analysis tests: sizes and random SAEs that fire often."""

from __future__ import annotations

import torch

from saekit import SAE

VOCAB = 300
D_MODEL = 32


def make_sae(
    hook: str, d_in: int = D_MODEL, d_sae: int = 64, seed: int = 0, architecture: str = "standard",
    **fields,
) -> SAE:
    """A random SAE on `hook` whose latents fire often, with sizeable decoder rows."""
    torch.manual_seed(seed)
    sae = SAE.create(architecture, d_in, d_sae, **fields)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn_like(sae.W_enc) / d_in**0.5)
        sae.W_dec.copy_(torch.randn_like(sae.W_dec) / d_sae**0.5)
        if hasattr(sae, "b_enc"):
            sae.b_enc.fill_(0.1)
    sae.cfg.metadata.hook_name = hook
    return sae
