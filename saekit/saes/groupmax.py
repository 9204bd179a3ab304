"""Group-max SAEs, EleutherAI sparsify's `activation: "groupmax"`.

The d_sae latents are cut into k contiguous groups of d_sae / k; on each token every group
keeps only its largest ReLU'd pre-activation. So exactly one latent per group may fire (none
where the whole group is at or below zero), k latents per token at most, like top-k but with
the competition local to a group. Decoding is the plain sum of the kept latents' rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from saekit.config import SAEConfig
from saekit.saes.registry import register_architecture
from saekit.saes.topk import TopKFamily


def group_max(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, latent indices) of each group's largest entry, for scores [..., d_sae] cut
    into k equal groups: both [..., k]. The first of tied entries wins (torch.max's rule)."""
    grouped = scores.unflatten(-1, (k, scores.shape[-1] // k))  # [..., k, group]
    values, within = grouped.max(dim=-1)
    offsets = torch.arange(k, device=scores.device) * grouped.shape[-1]
    return values, within + offsets


@register_architecture("groupmax")
class GroupMaxSAE(TopKFamily):
    """Top-1 in each of k equal, contiguous groups of latents (`cfg.k` is the group count)."""

    @classmethod
    def config_defaults(
        cls, d_in: int, d_sae: int, target_l0: float | None = None
    ) -> dict[str, Any]:
        wanted = int(target_l0) if target_l0 else min(cls.default_k, d_sae)
        # The largest group count not above the one asked for that splits d_sae evenly.
        k = next(n for n in range(max(1, min(wanted, d_sae)), 0, -1) if d_sae % n == 0)
        return {"k": k}

    def validate_config(self, cfg: SAEConfig) -> None:
        super().validate_config(cfg)
        assert cfg.k is not None
        if cfg.d_sae % cfg.k:
            raise ValueError(
                f"groupmax splits the d_sae={cfg.d_sae} latents into k={cfg.k} equal groups, "
                f"but {cfg.d_sae} is not a multiple of {cfg.k}; pick k that divides d_sae"
            )
        if cfg.rescale_acts_by_decoder_norm:
            raise ValueError(
                "groupmax has no rescale_acts_by_decoder_norm mode; set it to false"
            )

    def activation(self, hidden_pre: Tensor) -> Tensor:
        assert self.cfg.k is not None
        values, latents = group_max(torch.relu(hidden_pre), self.cfg.k)
        return torch.zeros_like(hidden_pre).scatter_(-1, latents, values)

    def select(self, scores: Tensor) -> tuple[Tensor, Tensor]:
        assert self.cfg.k is not None
        latent = group_max(scores, self.cfg.k)[1]  # [batch, k]
        token = torch.arange(scores.shape[0], device=scores.device).repeat_interleave(self.cfg.k)
        return token, latent.flatten()

    @staticmethod
    def kept_bar(scores: Tensor, k: int) -> Tensor:
        # A latent must beat the best of its own group; the weakest group winner is the bar a
        # latent in that group faces at least, so this bar errs towards lifting too little.
        return group_max(scores, k)[0].min(dim=-1, keepdim=True).values

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        norms = self.decoder_norms()
        # Scaling latents by different factors would change which one wins its group.
        if not torch.allclose(norms, norms.mean().expand_as(norms), rtol=1e-4):
            raise ValueError(
                "folding decoder norms into a groupmax SAE would change which latent wins each "
                "group; it is only possible when every decoder row has the same norm"
            )
        super().fold_W_dec_norm()
