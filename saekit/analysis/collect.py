"""`feature_statistics`: run a model over token batches and gather every latent's statistics.

An SAE reads one hook of one model. A crosscoder reads several sites at once: several hooks of
one model (one forward pass per batch) or the same hook of several models that share a
tokenizer (model diffing: each model runs once per batch on the same tokens). Its input is
every site's activation stacked, [batch, pos, n_sites, d_in], and its statistics also carry
each latent's decoder norm per site (`FeatureStats.crosscoder`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from saekit.analysis.crosscoder_norms import crosscoder_norms
from saekit.analysis.stats import FeatureStats, FeatureStatsAccumulator, logit_effects
from saekit.data.tokens import keep_mask, special_token_ids
from saekit.models.backend import ModelBackend
from saekit.progress import bar
from saekit.saes.base import SAE
from saekit.saes.crosscoder import MODELS_KEY, Crosscoder
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
    hooks: str | Sequence[str] | None = None,
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

    `model` is a backend or anything `load_model` takes; for a crosscoder over several models
    (model diffing), a list of them, one per site, sharing a tokenizer. `hooks` are a
    crosscoder's hook per site (one name: that hook of every model; default: the hooks its
    metadata records); other SAEs read the hook their metadata names. Special tokens (BOS,
    EOS, padding) are left out: they neither count as tokens nor become examples. Logit
    effects are added when the SAE writes to a space the unembedding reads (not for
    crosscoders, which write to several sites). `progress` shows a bar of the tokens read
    (None: as `saekit.progress` is set).
    """
    backend, latents_of = latent_reader(sae, model, hooks)
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
            acc.update(tokens, latents_of(tokens), keep_mask(tokens.cpu(), specials))
            n_batches += 1
            shown.update(tokens.numel())
    if n_batches == 0:
        raise ValueError("no token batches were given; pass at least one [batch, pos] tensor")
    stats = acc.result()
    stats.crosscoder = crosscoder_norms(sae)
    W_U = None if sae.multi_site else unembedding(backend)
    if W_U is not None and W_U.shape[0] == sae.cfg.output_width:
        top, bottom = logit_effects(sae.W_dec.detach(), W_U.to(sae.device), n_logits)
        stats.logit_top, stats.logit_bottom = top, bottom
    else:
        logger.info("no logit effects: the SAE does not write to the unembedding's input")
    return stats


def statistics_models(sae: SAE, model: Any = None, backend: str = "auto") -> Any:
    """The backend(s) the SAE's statistics read: `model` (a name, an object, or for a
    crosscoder over several models a list of them, one per site), else the model its metadata
    names, or, for a model-diffing crosscoder, each model it records (`model_names`)."""
    from saekit.models import load_model
    from saekit.targets import resolve_model

    if isinstance(model, (list, tuple)):
        return [resolve_model([sae], one, backend) for one in model]
    names = sae.cfg.metadata.extra.get(MODELS_KEY) if isinstance(sae, Crosscoder) else None
    if model is not None or not isinstance(names, list) or len(names) < 2:
        return resolve_model([sae], model, backend)
    backends = []
    for name in names:
        try:
            backends.append(load_model(str(name), backend=backend, device=sae.device))
        except Exception as err:  # noqa: BLE001 - any load failure gets the same advice
            raise ValueError(
                f"could not load the model {name!r} this crosscoder compares (its metadata's "
                f"model_names): {err}. Pass the models explicitly, one per site "
                "(model=[...] in Python)"
            ) from err
    return backends


def latent_reader(
    sae: SAE, model: Any, hooks: str | Sequence[str] | None = None
) -> tuple[Any, Callable[[Tensor], Tensor]]:
    """(the backend whose tokenizer frames the text, a function from tokens [batch, pos] to
    the SAE's latents [batch, pos, d_sae]) for `sae` on `model` (see `feature_statistics`)."""
    from saekit.models import load_model

    if isinstance(sae, Crosscoder):
        return _crosscoder_reader(sae, model, hooks)
    if sae.multi_site:
        raise ValueError(
            f"feature statistics read one hook, or the sites of a crosscoder; a "
            f"{sae.architecture} is not supported"
        )
    if isinstance(model, (list, tuple)):
        raise ValueError(
            f"a {sae.architecture} SAE reads one model, got a list of {len(model)}; several "
            "models are for crosscoders"
        )
    if hooks is not None:
        raise ValueError("hooks= is for crosscoders; an SAE reads the hook its metadata names")
    backend = load_model(model)
    site = sae_site(sae)

    def latents_of(tokens: Tensor) -> Tensor:
        act = backend.activations(tokens, [site.hook_in])[site.hook_in]
        return sae.encode(sae_region(sae, act, site.head_index).to(sae.device))

    return backend, latents_of


def _crosscoder_reader(
    crosscoder: Crosscoder, model: Any, hooks: str | Sequence[str] | None
) -> tuple[Any, Callable[[Tensor], Tensor]]:
    from saekit.models import load_model
    from saekit.models.side_by_side import SideBySideModels
    from saekit.saes.crosscoder import crosscoder_sites

    listed = list(model) if isinstance(model, (list, tuple)) else [model]
    recorded = crosscoder.cfg.metadata.extra.get(MODELS_KEY)
    if len(listed) == 1 and isinstance(recorded, list) and len(recorded) > 1:
        raise ValueError(
            f"this crosscoder compares {len(recorded)} models ({', '.join(map(str, recorded))});"
            " pass them all, one per site, e.g. model=[model_a, model_b]"
        )
    backends = [load_model(m) for m in listed]
    site_hooks = crosscoder_sites(crosscoder, backends, hooks)
    if len(backends) == 1:
        source: Any = backends[0]
        keys = site_hooks
    else:
        source = SideBySideModels(backends)  # checks that the tokenizers agree
        keys = [SideBySideModels.site(i, hook) for i, hook in enumerate(site_hooks)]

    def latents_of(tokens: Tensor) -> Tensor:
        acts = source.activations(tokens, keys)
        stacked = torch.stack([acts[k].to(crosscoder.device) for k in keys], dim=-2)
        return crosscoder.encode(stacked)  # [batch, pos, n_sites, d_in] -> [batch, pos, d_sae]

    return backends[0], latents_of
