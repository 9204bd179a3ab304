"""The evaluation pass: several SAEs on one model, over token batches, in one sweep.

Per batch the model runs once clean (logits, with the SAEs' input and output activations
captured on the way), once per SAE with its reconstruction spliced in, and once per distinct
output site with that activation zero-ablated. Without the downstream figures it runs once,
and stops after the last hook needed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from saekit.data.tokens import keep_mask, special_token_ids
from saekit.evals.accumulators import (
    DownstreamAccumulator,
    ReconstructionAccumulator,
    SparsityAccumulator,
)
from saekit.evals.downstream import PredictionScorer
from saekit.evals.metrics import EvalMetrics
from saekit.evals.token_pass import TokenPass
from saekit.models.backend import ModelBackend, Replacement
from saekit.models.hooks import replace_head, select_head
from saekit.saes.base import SAE
from saekit.sites import SAESite, check_one_site, reads_heads, sae_region, sae_site

logger = logging.getLogger(__name__)


def _per_token(t: Tensor, mask: Tensor) -> Tensor:
    """[batch, pos, ...] -> [evaluated tokens, features], dropping masked positions."""
    flat = t.reshape(t.shape[0] * t.shape[1], -1)
    return flat[mask.reshape(-1).to(flat.device)]


def _encode_decode(sae: SAE, x: Tensor) -> tuple[Tensor, Tensor]:
    """(latents, reconstruction in the input's scale and shape)."""
    x = x.to(sae.device)
    latents = sae.encode(x)
    if type(sae).forward is SAE.forward:
        recon = sae.decode(latents)
    else:  # the architecture adds something beyond decode (e.g. a skip path)
        recon = sae(x)
    return latents, recon


def _masked_replacement(
    values: Tensor | None, mask: Tensor, head_index: int | None, flat_heads: bool
) -> Replacement:
    """A replacement writing `values` (zeros when None) at evaluated positions only;
    special tokens keep their clean activation, as they are excluded from the metrics."""

    def fn(region: Tensor) -> Tensor:
        shape = region.shape
        if flat_heads:
            region = region.flatten(-2)
        new = (
            torch.zeros_like(region) if values is None else values.to(region).reshape(region.shape)
        )
        keep = mask.to(region.device).reshape(*mask.shape, *([1] * (region.ndim - 2)))
        return torch.where(keep, new, region).reshape(shape)

    return replace_head(fn, head_index)


class _SiteAccumulators:
    """One SAE's site and accumulators."""

    def __init__(self, sae: SAE, site: SAESite, downstream: bool) -> None:
        self.sae = sae
        self.site = site
        self.recon = ReconstructionAccumulator()
        self.sparsity = SparsityAccumulator(sae.cfg.d_sae)
        self.downstream = DownstreamAccumulator() if downstream else None

    def flat_heads(self, act: Tensor) -> bool:
        region = select_head(act, self.site.head_index)
        return region.ndim == 4 and not reads_heads(self.sae)

    def result(self) -> EvalMetrics:
        return EvalMetrics.from_stats(
            self.recon.result(),
            self.sparsity.result(),
            self.downstream.result() if self.downstream is not None else None,
        )


def evaluate_saes(
    model: ModelBackend,
    saes: Sequence[SAE],
    token_batches: Iterable[Tensor],
    *,
    downstream: bool = True,
    sites: Sequence[SAESite] | None = None,
    special_ids: Iterable[int] | None = None,
    max_tokens: int | None = None,
    progress: bool | None = None,
) -> list[EvalMetrics]:
    """Evaluate several SAEs on the same model in one pass over `token_batches`.

    Args:
        model: the model backend the SAEs belong to.
        saes: the SAEs; each reads the hook named in its metadata unless `sites` says
            otherwise (a CLT or a crosscoder reads several at once and is refused:
            `evaluate_clt` and `evaluate_crosscoder` evaluate them).
        token_batches: held-out token ids, each [batch, pos] (not the training tokens).
        downstream: also run the model with each SAE spliced in and with each site
            zero-ablated, for the CE and KL figures.
        sites: one `SAESite` per SAE, overriding the metadata.
        special_ids: token ids excluded from every metric; default: the tokenizer's special
            tokens (BOS, EOS, padding).
        max_tokens: stop after this many tokens (counted before masking).
        progress: show a bar of the tokens evaluated (None: as `saekit.progress` is set).

    Returns:
        One `EvalMetrics` per SAE, in order.
    """
    if not saes:
        raise ValueError("no SAEs to evaluate")
    for sae in saes:
        check_one_site(sae, "evaluate_saes takes SAEs that read one hook")
    sites = list(sites) if sites is not None else [sae_site(sae) for sae in saes]
    if len(sites) != len(saes):
        raise ValueError(f"got {len(sites)} sites for {len(saes)} SAEs")
    runs = [_SiteAccumulators(sae, site, downstream) for sae, site in zip(saes, sites, strict=True)]
    specials = special_token_ids(model.tokenizer) if special_ids is None else set(special_ids)
    hooks = list(dict.fromkeys(h for s in sites for h in (s.hook_in, s.hook_out)))
    batches = TokenPass(
        token_batches, desc="evaluating", max_tokens=max_tokens, progress=progress,
        whole_rows=True,
    )
    with torch.no_grad():
        for tokens in batches:
            _evaluate_batch(model, runs, hooks, tokens, specials, downstream)
    logger.debug("evaluated %d SAE(s) on %d tokens", len(runs), batches.seen)
    return [run.result() for run in runs]


def _evaluate_batch(
    model: ModelBackend,
    runs: list[_SiteAccumulators],
    hooks: list[str],
    tokens: Tensor,
    specials: set[int],
    downstream: bool,
) -> None:
    mask = keep_mask(tokens, specials)  # [batch, pos]
    if downstream:
        captured: dict[str, Tensor] = {}

        def capture(name: str) -> Replacement:
            def fn(act: Tensor) -> Tensor:
                captured[name] = act.detach()
                return act

            return fn

        clean_logits = model.logits(tokens, {h: capture(h) for h in hooks})
        acts = captured
    else:
        acts = model.activations(tokens, hooks)

    recons: list[Tensor] = []
    for run in runs:
        site = run.site
        x = sae_region(run.sae, acts[site.hook_in], site.head_index)
        target = (
            x
            if site.hook_out == site.hook_in
            else sae_region(run.sae, acts[site.hook_out], site.head_index)
        )
        latents, recon = _encode_decode(run.sae, x)
        run.sparsity.update(_per_token(latents, mask))
        if latents.ndim == 3:  # [batch, pos, d_sae]: count the sequences each latent fires in
            run.sparsity.count_sequences(latents, mask)
        run.recon.update(_per_token(target, mask), _per_token(recon, mask).to(target.device))
        recons.append(recon)
    if not downstream:
        return

    scored = PredictionScorer(clean_logits, tokens, mask)

    ablated: dict[tuple[str, int | None], tuple[Tensor, Tensor]] = {}
    for run, recon in zip(runs, recons, strict=True):
        site = run.site
        flat = run.flat_heads(acts[site.hook_out])
        key = (site.hook_out, site.head_index)
        if key not in ablated:  # zeros look the same whatever shape the SAE sees them in
            zero = _masked_replacement(None, mask, site.head_index, flat_heads=False)
            ablated[key] = scored(model.logits(tokens, {site.hook_out: zero}))
        splice = _masked_replacement(recon, mask, site.head_index, flat)
        ce_sae, kl_sae = scored(model.logits(tokens, {site.hook_out: splice}))
        ce_abl, kl_abl = ablated[key]
        assert run.downstream is not None
        run.downstream.update(scored.ce_clean, ce_sae, ce_abl, kl_sae, kl_abl)
