"""`feature_statistics`: run a model over token batches and gather every latent's statistics."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from saekit.analysis.stats import FeatureStats, FeatureStatsAccumulator, logit_effects
from saekit.data.tokens import keep_mask, special_token_ids
from saekit.models.backend import ModelBackend
from saekit.progress import bar
from saekit.saes.base import SAE
from saekit.sites import sae_region, sae_site

logger = logging.getLogger(__name__)


def unembedding(backend: ModelBackend) -> Tensor | None:
    """The model's unembedding W_U [d_model, vocab], or None when it cannot be found."""
    model = getattr(backend, "model", None)
    if model is None:
        return None
    if isinstance(getattr(model, "W_U", None), Tensor):  # TransformerLens
        return model.W_U.detach()
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    if out is not None and isinstance(getattr(out, "weight", None), Tensor):
        return out.weight.detach().T  # nn.Linear stores [vocab, d_model]
    return None


@torch.no_grad()
def feature_statistics(
    sae: SAE,
    model: Any,
    token_batches: Iterable[Tensor],
    *,
    top_k: int = 20,
    n_samples: int = 40,
    left: int = 12,
    right: int = 4,
    n_bins: int = 32,
    n_logits: int = 10,
    seed: int = 0,
    progress: bool | None = None,
) -> FeatureStats:
    """Statistics of every latent of `sae` over `token_batches` ([batch, pos] each).

    `model` is a backend or anything `load_model` takes. Special tokens (BOS, EOS, padding)
    are left out: they neither count as tokens nor become examples. Logit effects are added
    when the SAE writes to a space the unembedding reads. `progress` shows a bar of the
    tokens read (None: as `saekit.progress` is set).
    """
    from saekit.models import load_model

    backend = load_model(model)
    site = sae_site(sae)
    specials = special_token_ids(backend.tokenizer)
    acc = FeatureStatsAccumulator(
        sae.cfg.d_sae, top_k=top_k, n_samples=n_samples, left=left, right=right,
        n_bins=n_bins, seed=seed,
    )
    n_batches = 0
    total = None
    if isinstance(token_batches, (list, tuple)):  # batches in memory: count them up front
        total = sum(t.numel() for t in token_batches if isinstance(t, Tensor))
    with bar(desc="feature statistics", unit="tok", total=total, progress=progress) as shown:
        for tokens in token_batches:
            act = backend.activations(tokens, [site.hook_in])[site.hook_in]
            latents = sae.encode(sae_region(sae, act, site.head_index).to(sae.device))
            acc.update(tokens, latents, keep_mask(tokens.cpu(), specials))
            n_batches += 1
            shown.update(tokens.numel())
    if n_batches == 0:
        raise ValueError("no token batches were given; pass at least one [batch, pos] tensor")
    stats = acc.result()
    W_U = unembedding(backend)
    if W_U is not None and W_U.shape[0] == sae.cfg.output_width:
        top, bottom = logit_effects(sae.W_dec.detach(), W_U.to(sae.device), n_logits)
        stats.logit_top, stats.logit_bottom = top, bottom
    else:
        logger.info("no logit effects: the SAE does not write to the unembedding's input")
    return stats
