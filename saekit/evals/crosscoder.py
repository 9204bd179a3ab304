"""Held-out evaluation of a crosscoder: each site's reconstruction (explained variance, MSE
and the rest of the standard reconstruction metrics) and the shared latents' sparsity (L0,
dead and dense fractions), from one pass of the model(s) per batch of tokens.

A crosscoder reads the same token at every site, so one set of latents serves all sites:
sparsity figures are the crosscoder's, reconstruction figures are per site. Special tokens
are left out of every figure, as in every saekit evaluation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saekit.data.tokens import keep_mask, special_token_ids
from saekit.evals.accumulators import (
    ReconstructionAccumulator,
    ReconstructionStats,
    SparsityAccumulator,
    SparsityStats,
)
from saekit.evals.token_pass import TokenPass, eval_mode
from saekit.saes.crosscoder import Crosscoder


@dataclass
class CrosscoderEvaluation:
    """A crosscoder's held-out figures."""

    sites: list[ReconstructionStats]
    """Per site, in the crosscoder's order: its reconstruction of that site."""
    sparsity: SparsityStats
    """The shared latents' sparsity (L0 is latents per token, over all sites at once)."""
    site_names: list[str]
    """What each site reads (the hook, or `<model>/<hook>` for model diffing)."""

    @property
    def explained_variance(self) -> list[float]:
        """Per site: 1 - E||x - x^||^2 / the variance of x about its mean."""
        return [s.explained_variance for s in self.sites]

    def to_dict(self) -> dict[str, Any]:
        """The scalar figures: l0, l1, dead and dense fractions, n_tokens, and under `sites`
        one mapping per site (its name and reconstruction metrics)."""
        sp = self.sparsity
        return {
            "l0": sp.l0,
            "l1": sp.l1,
            "dead_fraction": sp.dead_fraction,
            "dense_fraction": sp.dense_fraction,
            "explained_variance": self.explained_variance,
            "n_tokens": sp.n_tokens,
            "sites": [
                {
                    "site": name, "explained_variance": s.explained_variance, "mse": s.mse,
                    "cos_sim": s.cos_sim, "l2_ratio": s.l2_ratio,
                    "relative_reconstruction_bias": s.relative_reconstruction_bias,
                }
                for name, s in zip(self.site_names, self.sites, strict=True)
            ],
        }


def evaluate_crosscoder(
    crosscoder: Crosscoder,
    model: Any,
    token_batches: Iterable[Tensor],
    hooks: Sequence[str],
    *,
    site_names: Sequence[str] | None = None,
    special_ids: Iterable[int] | None = None,
    max_tokens: int | None = None,
    progress: bool | None = None,
) -> CrosscoderEvaluation:
    """Evaluate a crosscoder over held-out `token_batches` ([batch, pos] each; not the
    training tokens). `model` is a backend whose `activations(tokens, hooks)` gives each
    site's activation (one model at several hooks, or `SideBySideModels` with its `<i>/<hook>`
    names); `hooks` lists the sites in the crosscoder's order. `special_ids` default to the
    tokenizer's special tokens; `max_tokens` stops early."""
    if not isinstance(crosscoder, Crosscoder):
        raise ValueError(
            f"evaluate_crosscoder evaluates a crosscoder, got {type(crosscoder).__name__}"
        )
    hooks = list(hooks)
    if len(hooks) != crosscoder.n_sites:
        raise ValueError(
            f"a crosscoder over {crosscoder.n_sites} sites needs {crosscoder.n_sites} hooks, "
            f"got {hooks}"
        )
    names = list(site_names) if site_names is not None else hooks
    specials = special_token_ids(model.tokenizer) if special_ids is None else set(special_ids)
    recon_acc = [ReconstructionAccumulator() for _ in hooks]
    sparse_acc = SparsityAccumulator(crosscoder.cfg.d_sae)
    batches = TokenPass(
        token_batches, desc="evaluating crosscoder", max_tokens=max_tokens, progress=progress
    )
    with torch.no_grad(), eval_mode(crosscoder):
        for tokens in batches:
            keep = keep_mask(tokens, specials).reshape(-1)  # [batch * pos]
            acts = model.activations(tokens, hooks)
            # [kept tokens, n_sites, d_in]
            x = torch.stack([acts[h].reshape(-1, acts[h].shape[-1]) for h in hooks], dim=1)
            x = x[keep.to(x.device)].to(crosscoder.device)
            latents = crosscoder.encode(x)  # [kept tokens, d_sae]
            recon = crosscoder.decode(latents).to(x.dtype)  # [kept tokens, n_sites, d_in]
            sparse_acc.update(latents)
            for site, acc in enumerate(recon_acc):
                acc.update(x[:, site], recon[:, site])
    return CrosscoderEvaluation([a.result() for a in recon_acc], sparse_acc.result(), names)
