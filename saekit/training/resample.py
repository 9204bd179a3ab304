"""Resampling dead latents (Anthropic, "Towards Monosemanticity", 2023), as the trainer runs it.

Every `resample_every` tokens, while the first part of training lasts, latents that have not
fired for the dead window are started afresh, each on an example of the current batch that
the SAE reconstructs poorly (picked with probability proportional to its squared error), and
their Adam state is reset. What "afresh" means for an architecture's weights is the SAE's
business (`SAE.resample_latents`); this module decides when, which latents and which examples.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saekit.saes.base import SAE
from saekit.training.config import TrainingSection

#: Examples of a batch that one event may hand out: at most a quarter of its rows, so that
#: the latents of one event start in different directions (the rest wait for the next event).
ROWS_PER_LATENT = 4
#: Base of the per-step seed. The choices come from a generator seeded by the step alone, so
#: every data-parallel rank makes the same ones and a resumed run makes them again.
SEED_BASE = 0x5AE


class DeadLatentResampler:
    """When and what to resample for one SAE."""

    def __init__(self, cfg: TrainingSection) -> None:
        self.every = cfg.resample_every
        self.until = int(cfg.resample_until * cfg.tokens)
        self.dead_window = cfg.dead_window

    def due(self, before: int, after: int) -> bool:
        """Whether a step that took the token count from `before` to `after` ends at an event."""
        if self.every <= 0 or after > self.until or after < self.dead_window:
            return False
        return before // self.every != after // self.every

    @torch.no_grad()
    def resample(
        self, sae: SAE, optimizer: torch.optim.Optimizer, dead: Tensor, centred: Tensor,
        residual: Tensor, firing_rate: float, step: int,
    ) -> Tensor:
        """Start (some of) the latents marked in `dead` [d_sae] afresh on the batch
        (`centred` [batch, d_in], `residual` [batch, d_out]); returns those started."""
        candidates = dead.nonzero().squeeze(1)
        errors = residual.float().pow(2).sum(dim=1)  # [batch]
        n = min(candidates.numel(), residual.shape[0] // ROWS_PER_LATENT, int((errors > 0).sum()))
        if n == 0:
            return candidates[:0]
        generator = torch.Generator(device="cpu").manual_seed(SEED_BASE * 1_000_003 + step)
        order = torch.randperm(candidates.numel(), generator=generator)[:n]
        latents = candidates[order.to(candidates.device)]
        rows = torch.multinomial(errors.cpu(), n, replacement=False, generator=generator)
        sae.resample_latents(latents, centred, residual, rows.to(residual.device), firing_rate)
        reset_optimizer_state(optimizer, sae, latents)
        return latents


@torch.no_grad()
def reset_optimizer_state(optimizer: torch.optim.Optimizer, sae: SAE, latents: Tensor) -> None:
    """Forget Adam's moments for `latents`: the first moment goes to zero, the second to the
    mean of the other latents' (zero there would make the first steps of a fresh latent
    about 3x the usual size, Adam's bias correction being long past)."""
    parameters = dict(sae.named_parameters())
    others = torch.ones(sae.cfg.d_sae, dtype=torch.bool, device=latents.device)
    others[latents] = False
    for name, axis in sae.latent_axes().items():
        state = optimizer.state.get(parameters[name])
        if not state:
            continue
        state["exp_avg"].index_fill_(axis, latents, 0.0)
        second = state["exp_avg_sq"].movedim(axis, 0)  # a view: [d_sae, ...]
        if bool(others.any()):
            second[latents] = second[others].mean(dim=0, keepdim=True)
        else:
            second[latents] = 0.0
