"""Edits of latents at chosen positions: ablate, clamp, scale.

Each edit is a hook function for an SAE's `hook_sae_acts_post` point:

    model.run_with_hooks(tokens, {"blocks.1.hook_resid_pre.hook_sae_acts_post":
                                  ablate_latents([12, 40], positions=[3])})
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

#: Which sequence positions an edit touches: None (all), an index, a list of indices, a
#: slice, or a boolean mask [pos] or [batch, pos].
Positions = int | Sequence[int] | slice | Tensor | None

EDIT_MODES = ("ablate", "clamp", "scale")


def position_mask(positions: Positions, batch: int, n_pos: int, device: torch.device) -> Tensor:
    """Boolean [batch, pos] mask for `positions` (negative indices count from the end)."""
    if positions is None:
        return torch.ones(batch, n_pos, dtype=torch.bool, device=device)
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        mask = positions.to(device)
        if mask.shape == (n_pos,):
            mask = mask.expand(batch, n_pos)
        if mask.shape != (batch, n_pos):
            raise ValueError(
                f"a position mask must be [pos] or [batch, pos] = [{batch}, {n_pos}], "
                f"got {tuple(mask.shape)}"
            )
        return mask
    mask = torch.zeros(n_pos, dtype=torch.bool, device=device)
    if isinstance(positions, slice):
        mask[positions] = True
    else:
        index = [positions] if isinstance(positions, int) else [int(p) for p in positions]
        bad = [p for p in index if not -n_pos <= p < n_pos]
        if bad:
            raise ValueError(f"positions {bad} are out of range for sequences of {n_pos} tokens")
        mask[index] = True
    return mask.expand(batch, n_pos)


@dataclass(frozen=True)
class LatentEdit:
    """Set (clamp), zero (ablate) or multiply (scale) some latents at some positions.

    Called on latents [batch, pos, d_sae] (or [pos, d_sae]); returns edited latents.
    """

    latents: tuple[int, ...]
    mode: str
    value: float = 0.0
    positions: Positions = None

    def __post_init__(self) -> None:
        if self.mode not in EDIT_MODES:
            raise ValueError(f"mode must be one of {EDIT_MODES}, got {self.mode!r}")
        if not self.latents:
            raise ValueError("name at least one latent to edit")

    def __call__(self, acts: Tensor) -> Tensor:
        squeeze = acts.ndim == 2
        if squeeze:
            acts = acts.unsqueeze(0)
        if acts.ndim != 3:
            raise ValueError(
                f"latent edits expect latents [batch, pos, d_sae], got {tuple(acts.shape)}"
            )
        d_sae = acts.shape[-1]
        bad = [i for i in self.latents if not 0 <= i < d_sae]
        if bad:
            raise ValueError(f"latents {bad} are out of range for an SAE of {d_sae} latents")
        where = position_mask(self.positions, acts.shape[0], acts.shape[1], acts.device)
        chosen = torch.zeros(d_sae, dtype=torch.bool, device=acts.device)
        chosen[list(self.latents)] = True
        where = where[:, :, None] & chosen  # [batch, pos, d_sae]
        if self.mode == "ablate":
            new = torch.zeros_like(acts)
        elif self.mode == "clamp":
            new = torch.full_like(acts, self.value)
        else:
            new = acts * self.value
        out = torch.where(where, new, acts)
        return out[0] if squeeze else out


def _latent_tuple(latents: int | Sequence[int]) -> tuple[int, ...]:
    return (int(latents),) if isinstance(latents, int) else tuple(int(i) for i in latents)


def ablate_latents(latents: int | Sequence[int], positions: Positions = None) -> LatentEdit:
    """Zero the latents at the positions (all positions when None)."""
    return LatentEdit(_latent_tuple(latents), "ablate", 0.0, positions)


def clamp_latents(
    latents: int | Sequence[int], value: float, positions: Positions = None
) -> LatentEdit:
    """Set the latents to `value` at the positions, whether they fired or not."""
    return LatentEdit(_latent_tuple(latents), "clamp", float(value), positions)


def scale_latents(
    latents: int | Sequence[int], factor: float, positions: Positions = None
) -> LatentEdit:
    """Multiply the latents by `factor` at the positions."""
    return LatentEdit(_latent_tuple(latents), "scale", float(factor), positions)
