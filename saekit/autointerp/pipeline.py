"""`autointerp(sae, out, explainer=...)`: statistics and non-activating contexts for an SAE
and its model over held-out text, then `explain_latents`.

The statistics are those `saekit dashboard` gathers (pass them, or a folder holding them, to
reuse them); both they and the non-activating contexts are saved in the run folder, so a
resumed run works from exactly the same contexts and finds every answer in its cache.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from saekit.analysis.stats import FeatureStats
from saekit.autointerp.config import AutointerpConfig
from saekit.autointerp.negatives import NEGATIVES_FILE, NegativePool, negative_pool
from saekit.autointerp.prompts import TokenText
from saekit.autointerp.run import AutointerpResult, explain_latents
from saekit.autointerp.selection import LatentSelection, parse_latents
from saekit.saes.base import SAE

logger = logging.getLogger(__name__)

#: Tokens read for the statistics when none are asked for (as `saekit dashboard` reads).
DEFAULT_TOKENS = 32_768
#: Non-activating windows gathered: enough for 10 per latent even for latents that fire in
#: most windows, one short pass of the model.
DEFAULT_NEGATIVE_WINDOWS = 512


def saved_stats(folder: Path) -> FeatureStats | None:
    """The feature statistics saved in `folder`, or None when it holds none."""
    if not folder.is_dir():
        return None
    try:
        return FeatureStats.load(folder)
    except FileNotFoundError:
        return None


def _stats_for(
    sae: SAE, stats: FeatureStats | str | Path | None, out: Path, compute: Any, save: bool
) -> FeatureStats:
    """The statistics to work from: given, saved in `out`, or computed now (and saved in
    `out` when `save`, then read back, so that this run and a resumed one see the same
    numbers whatever the saved precision)."""
    if isinstance(stats, FeatureStats):
        found = stats
    elif stats is not None:
        found = FeatureStats.load(stats)
    else:
        found = saved_stats(out)
        if found is not None:
            logger.info("using the feature statistics saved in %s", out)
        else:
            found = compute()
            if save:
                found.save(out)
                found = FeatureStats.load(out)
    if found.d_sae != sae.cfg.d_sae:
        raise ValueError(
            f"the feature statistics describe {found.d_sae} latents but the SAE has "
            f"{sae.cfg.d_sae}; they were gathered for another SAE"
        )
    return found


def autointerp(
    sae: SAE,
    out: str | Path,
    *,
    explainer: Any,
    scorer: Any = None,
    latents: str | Sequence[int] | LatentSelection = "random:100",
    model: Any = None,
    dataset: Any = None,
    stats: FeatureStats | str | Path | None = None,
    n_tokens: int = DEFAULT_TOKENS,
    context_size: int | None = None,
    model_batch_size: int = 16,
    negative_windows: int = DEFAULT_NEGATIVE_WINDOWS,
    config: AutointerpConfig | None = None,
    concurrency: int | None = None,
    replace: bool = False,
    dry_run: bool = False,
    progress: bool | None = None,
    backend: str = "auto",
) -> AutointerpResult:
    """Explain and score latents of `sae`; results in `out/explanations.jsonl`.

    `explainer`/`scorer`: a client, a callable (chat messages -> text) or a spec
    (`openai:MODEL`, `hf:NAME_OR_PATH`); the scorer defaults to the explainer. `latents`:
    ids, `0-999`, `random:N` or `all`. `model` defaults to the SAE's model, `dataset` to the
    bundled corpus's held-out works. `stats`: statistics (or their folder) to reuse; else
    those in `out`, else they are gathered over `n_tokens` tokens. With `dry_run` nothing is
    sent or written; `result.plan` says what would be.
    """
    from saekit.analysis.collect import feature_statistics
    from saekit.autointerp.clients import make_client
    from saekit.evals.api import DEFAULT_CONTEXT_SIZE, heldout_token_batches
    from saekit.models.positions import check_context_size
    from saekit.preflight import check_out_folder
    from saekit.targets import resolve_model

    cfg = config or AutointerpConfig()
    parse_latents(latents).check(sae.cfg.d_sae)
    explainer = make_client(explainer)
    scorer = make_client(scorer, flag="--scorer") if scorer is not None else None
    check_out_folder(out)
    out = Path(out)
    model_backend = resolve_model([sae], model, backend)
    meta = sae.cfg.metadata
    context = context_size or meta.context_size or DEFAULT_CONTEXT_SIZE
    check_context_size(model_backend, context)

    def batches(tokens: int) -> list[Any]:
        return heldout_token_batches(
            model_backend.tokenizer, tokens, dataset=dataset, context_size=context,
            batch_size=model_batch_size, prepend_bos=meta.window_prepend_bos,
        )

    found = _stats_for(
        sae, stats, out,
        lambda: feature_statistics(sae, model_backend, batches(n_tokens), progress=progress),
        save=not dry_run,
    )
    if (out / NEGATIVES_FILE).is_file():
        pool = NegativePool.load(out)
        if pool.d_sae != sae.cfg.d_sae:
            raise ValueError(
                f"{out / NEGATIVES_FILE} is for an SAE of {pool.d_sae} latents, not "
                f"{sae.cfg.d_sae}; use another --out"
            )
    else:
        width = found.top.tokens.shape[2]
        # Windows holding a special token are skipped, and each row loses a random phase.
        pool = negative_pool(
            sae, model_backend, batches(2 * negative_windows * width), width=width,
            n_windows=negative_windows, seed=cfg.seed, progress=progress,
        )
        if not dry_run:
            out.mkdir(parents=True, exist_ok=True)
            pool.save(out)
    return explain_latents(
        found, pool, TokenText(model_backend.tokenizer), out, explainer=explainer,
        scorer=scorer, latents=latents, config=cfg, concurrency=concurrency,
        replace=replace, dry_run=dry_run, progress=progress,
    )
