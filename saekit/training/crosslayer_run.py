"""A `saekit train` run of one SAE over several sites: a cross-layer transcoder (`--architecture
clt`) or a crosscoder (several hooks of one model, or one hook of two models: `--model-b`).

The run folder is a one-SAE run's (run_config.yaml, run_state.json, checkpoints/, log.jsonl,
the saved SAE, metrics.json), written by the same pieces (`saekit.training.run`). What
differs: the sites come from `saekit.training.multisite_plan`, the batches are every site's
activation of the same tokens stacked by `StackedBatches`, and the held-out evaluation is
`evaluate_clt` (per-layer FVU, replacement CE/KL) or `evaluate_crosscoder` (per-site
explained variance, L0, dead latents, and for two sites the relative decoder norm classes).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

from saekit.config import SAEConfig
from saekit.data.heldout import HeldoutText
from saekit.data.prefetch import Prefetcher
from saekit.models.backend import ModelBackend
from saekit.models.positions import check_context_size
from saekit.models.side_by_side import SideBySideModels, vocabulary
from saekit.preflight import check_train_dtype
from saekit.saes import SAE, architecture_class
from saekit.training.activations import (
    ActivationSource,
    heldout_text,
    model_or_cache_store,
    run_hooks,
)
from saekit.training.cache_source import PREFETCH_DEPTH, prefetches
from saekit.training.config import RUN_CONFIG_FILE, TrainConfig, resumed_config
from saekit.training.distributed import (
    DistEnv,
    Parallelism,
)
from saekit.training.multisite import StackedBatches, record_sites
from saekit.training.multisite_plan import (
    K_RULES,
    SitePlan,
    default_rule,
    plan_sites,
)
from saekit.training.run import (
    NORM_ESTIMATE_BATCHES,
    TrainOutcome,
    _preflight,
    _read_run_state,
    _run_metadata,
    _seed_everything,
    _wandb_sinks,
    finish_one_sae_run,
    fit_in_run_dir,
    has_checkpoint_to_resume,
    load_run_model,
    open_run_dir,
    saved_run_config,
)
from saekit.training.trainer import SAEJob

log = logging.getLogger(__name__)

#: metrics.json key of a two-site crosscoder's latent classes (a_only, shared, b_only,
#: neither) by relative decoder norm (`latent_classes`).
CLASSES_KEY = "relative_norm_classes"


def train_multisite(
    cfg: TrainConfig, model: Any, dataset: Any, env: DistEnv, given: Iterable[str] | None
) -> TrainOutcome:
    """Train the clt or crosscoder of `cfg` and write its run folder; `saekit.train` calls
    this for a multi-site architecture (and for resuming such a run)."""
    run_dir, resume, parallel = open_run_dir(cfg, env)
    if resume:
        cfg = resumed_config(TrainConfig.load(run_dir / RUN_CONFIG_FILE), cfg, given)
        resume = has_checkpoint_to_resume(run_dir, env.is_main)
    _preflight(cfg, model, dataset)
    _seed_everything(cfg.run.seed)

    backend, device = load_run_model(cfg, model, env)
    check_train_dtype(cfg.run.dtype, device)
    check_context_size(backend, cfg.data.context_size)
    backends = [backend]
    if cfg.data.model_b is not None:
        backends.append(_load_model_b(cfg, backend, device))
    reader = backend if len(backends) == 1 else _side_by_side(backends)
    desc = f"the {getattr(backend, 'name', None) or cfg.data.model} model"
    sites = plan_sites(
        cfg, backend.hook_names(), backends[1].hook_names() if len(backends) > 1 else None,
        _default_hook(backend), desc,
    )
    saved_state = _read_run_state(run_dir) if resume else None
    heldout, training_data = heldout_text(cfg, backend, dataset, None, saved_state)
    keys = sites.keys_in + (sites.keys_out or [])
    store = model_or_cache_store(
        cfg, reader, keys[0], None, training_data, device, env,
        model_given=model is not None, hooks=keys,
    )
    widths = _site_widths(dict(store.d_in), sites)
    dataset_name = cfg.data.dataset if dataset is None else None
    sae = _build(cfg, sites, widths, device, backend, backends, dataset_name, heldout, store)
    run_state = saved_state or _new_state(cfg, sites, store, parallel, heldout)
    job = SAEJob(
        sae, cfg.training, norm_scale=run_state["norm_scaling_factor"],
        evaluate=_evaluator(sae, backend, reader, sites, heldout) if env.is_main else None,
    )
    sinks, finish_wandb = _wandb_sinks(cfg) if env.is_main else ([], lambda: None)
    stacked = StackedBatches(store, sites.keys_in, sites.keys_out)
    source: Any = (
        Prefetcher(stacked, depth=PREFETCH_DEPTH, device=device)
        if prefetches(cfg, device) else stacked
    )
    result = fit_in_run_dir(
        cfg, job, source, run_dir, resume=resume, is_main=env.is_main, run_state=run_state,
        sinks=sinks, finish=finish_wandb, parallel=parallel, periodic=None,
    )
    two_site_crosscoder = not sites.keys_out and len(sites.keys_in) == 2
    return finish_one_sae_run(
        cfg, result, run_dir, backend, heldout, env.is_main, sinks,
        extra_metrics=(
            (lambda trained: {CLASSES_KEY: latent_classes(trained)})
            if two_site_crosscoder else None
        ),
    )


def _default_hook(backend: ModelBackend) -> str | None:
    """The hook a one-SAE run would read (the middle residual stream), None if none."""
    try:
        return run_hooks(TrainConfig(), backend)[0]
    except ValueError:
        return None


def _load_model_b(cfg: TrainConfig, backend: ModelBackend, device: str) -> ModelBackend:
    """Model diffing's second model, on the first one's device; refused when it does not
    tokenize as the first does (the two must read the same tokens)."""
    from saekit.models import load_model
    assert cfg.data.model_b is not None
    other = load_model(
        cfg.data.model_b, backend=cfg.data.backend,
        device=cfg.run.model_device or str(backend.device), device_map=cfg.data.device_map,
    )
    if vocabulary(other.tokenizer) != vocabulary(backend.tokenizer):
        raise ValueError(
            f"--model-b {cfg.data.model_b} tokenizes differently from --model "
            f"{cfg.data.model} (their vocabularies differ); model diffing reads both models on "
            "the same tokens, so give two models that share a tokenizer (e.g. a base model "
            "and its fine-tune)"
        )
    check_context_size(other, cfg.data.context_size)
    return other


def _side_by_side(backends: list[ModelBackend]) -> Any:

    return SideBySideModels(backends)


def _site_widths(found: dict[str, int], sites: SitePlan) -> tuple[int, int | None]:
    """(d_in, d_out) of the run: every input site must have one width, and every CLT output
    another; a ValueError names the sites that differ."""
    out: list[int | None] = []
    for what, keys in (("input", sites.keys_in), ("output", sites.keys_out)):
        if keys is None:
            out.append(None)
            continue
        widths = {k: int(found[k]) for k in keys}
        if len(set(widths.values())) != 1:
            raise ValueError(
                f"the {what} sites have different widths ({widths}); one SAE over several "
                "sites reads sites of one width, so choose hooks of the same kind"
            )
        out.append(next(iter(widths.values())))
    d_in = out[0]
    assert d_in is not None
    return d_in, out[1]


def _build(
    cfg: TrainConfig,
    sites: SitePlan,
    widths: tuple[int, int | None],
    device: str,
    backend: ModelBackend,
    backends: list[ModelBackend],
    dataset_name: str | None,
    heldout: HeldoutText | None,
    store: Any,
) -> SAE:
    """A fresh clt or crosscoder over the run's sites, its metadata naming them."""
    d_in, d_out = widths
    s = cfg.sae
    d_sae = s.d_sae or s.expansion_factor * d_in
    fields = architecture_class(s.architecture).config_defaults(
        d_in, d_sae, cfg.training.target_l0
    )
    rule = s.activation_fn or default_rule(s.architecture)
    fields["activation_fn"] = rule
    fields["n_layers"] = len(sites.keys_in)
    fields["apply_b_dec_to_input"] = False  # b_dec belongs to each site's output space
    if rule in K_RULES:
        target = cfg.training.target_l0
        fields["k"] = s.k or (int(target) if target else min(64, d_sae))
        if fields["k"] > d_sae:
            raise ValueError(
                f"k={fields['k']} is larger than d_sae={d_sae}; lower k or widen the SAE"
            )
    else:
        fields.pop("k", None)
    metadata = _run_metadata(
        cfg, ActivationSource(store, sites.hooks_in[0], None, {}), backend, dataset_name,
        heldout,
    )
    # The sites are in metadata.extra (below); a single hook name would say one site.
    metadata.hook_name = metadata.hook_name_out = None
    sae_cfg = SAEConfig(
        architecture=s.architecture, d_in=d_in, d_sae=d_sae, dtype=cfg.run.dtype,
        device=device, d_out=d_out if d_out != d_in else None, metadata=metadata, **fields,
    )
    sae = SAE.from_config(sae_cfg)
    if sites.hooks_out is not None:
        from saekit.saes.clt import record_hooks

        record_hooks(sae, sites.hooks_in, sites.hooks_out)  # type: ignore[arg-type]
    else:
        record_sites(sae, backends, sites.hooks_in, cfg.data.context_size)  # type: ignore[arg-type]
    return sae


def _new_state(
    cfg: TrainConfig,
    sites: SitePlan,
    store: Any,
    parallel: Parallelism,
    heldout: HeldoutText | None,
) -> dict[str, Any]:
    """What a resumed run reuses: the norm scaling factor and the documents held out.

    One factor for every site (inputs and targets alike), so that folding it into the
    weights at the end is exact: sqrt(d_in) / E||x|| with E||x|| averaged over the input
    sites, i.e. the harmonic mean of the sites' own factors."""
    factor = None
    if cfg.sae.norm_scaling:
        estimate = store.estimate_norm_scaling_factor(NORM_ESTIMATE_BATCHES)
        found = estimate if isinstance(estimate, dict) else {sites.keys_in[0]: estimate}
        own = [float(found[k]) for k in sites.keys_in]
        bad = {k: f for k, f in zip(sites.keys_in, own, strict=True)
               if not (math.isfinite(f) and f > 0)}
        if bad:
            raise ValueError(
                f"the norm scaling factors estimated at {bad} cannot scale activations; check "
                "the data at those hooks, or turn norm_scaling off"
            )
        factor = len(own) / sum(1 / f for f in own)
        factor = parallel.broadcast_object(factor)
    documents = heldout.heldout_documents if heldout is not None else 0
    return {"norm_scaling_factor": factor, "heldout_documents": documents}


def _evaluator(
    sae: SAE, backend: ModelBackend, reader: Any, sites: SitePlan, heldout: HeldoutText | None
) -> Any:
    """The trainer's final held-out evaluation of the finished SAE, as a metrics mapping."""
    if heldout is None:
        return None
    if sites.hooks_out is not None:
        hooks_in, hooks_out = sites.hooks_in, sites.hooks_out

        def evaluate_layers(clt: SAE) -> dict[str, Any]:
            from saekit.evals.crosslayer import evaluate_clt

            found = evaluate_clt(clt, backend, heldout.batches, hooks=(hooks_in, hooks_out))
            out = found.to_dict()  # type: ignore[arg-type]
            for layer, hook_in, hook_out in zip(out["layers"], hooks_in, hooks_out, strict=True):
                layer["hook_name"], layer["hook_name_out"] = hook_in, hook_out
            return out

        return evaluate_layers
    names = _site_names(sites, sae)

    def evaluate_sites(crosscoder: SAE) -> dict[str, Any]:
        from saekit.evals.crosscoder import evaluate_crosscoder

        return evaluate_crosscoder(
            crosscoder, reader, heldout.batches, sites.keys_in, site_names=names,  # type: ignore[arg-type]
        ).to_dict()

    return evaluate_sites


def _site_names(sites: SitePlan, sae: SAE) -> list[str]:
    """Each site as a reader would name it: the hook, or `<model> <hook>` across models."""
    from saekit.saes.crosscoder import MODELS_KEY

    models = sae.cfg.metadata.extra.get(MODELS_KEY)
    if not models:
        return list(sites.hooks_in)
    return [f"{m}: {h}" for m, h in zip(models, sites.hooks_in, strict=True)]


def latent_classes(crosscoder: SAE) -> dict[str, int]:
    """How many latents of a two-site crosscoder are a_only, shared, b_only or neither, by
    relative decoder norm: `CrosscoderNorms.counts`, the very counts its feature statistics,
    dashboard and `saekit dashboard` summary show."""
    from saekit.analysis.crosscoder_norms import CrosscoderNorms

    return CrosscoderNorms.of(crosscoder).counts()


def trains_multisite(cfg: TrainConfig) -> bool:
    """Whether the run (or, resuming, the saved run) trains a clt or crosscoder."""
    saved = saved_run_config(cfg)
    return cfg.multisite or (saved is not None and saved.multisite)
