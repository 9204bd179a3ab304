"""Random SAEs for tests (importable from any test folder: tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import torch

from saekit import SAE, architecture_class


def random_sae(architecture: str, d_in: int = 8, d_sae: int = 32, seed: int = 0, **fields) -> SAE:
    """An SAE whose every parameter is random and non-trivial, so no term hides behind a zero.

    Transcoders get d_out = d_in + 3 unless told otherwise; thresholds stay positive and small
    enough that a good share of latents fire.
    """
    torch.manual_seed(seed)
    if architecture_class(architecture).is_transcoder:
        fields.setdefault("d_out", d_in + 3)
    sae = SAE.create(architecture, d_in, d_sae, **fields)
    with torch.no_grad():
        for name, tensor in sae.state_dict().items():
            if name == "threshold":
                tensor.copy_(torch.rand_like(tensor) * 0.3 + 0.01)
            elif name.startswith("W_"):
                tensor.copy_(torch.randn_like(tensor) / tensor.shape[0] ** 0.5)
            else:
                tensor.copy_(torch.randn_like(tensor) * 0.2)
    return sae
