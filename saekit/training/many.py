"""A run of several SAEs (`saekit train --hook-name 'blocks.*.hook_resid_pre'`, `--layers`,
`--sweep`, `--seeds`, a `saes:` list): every SAE trains from one model pass per batch.

The model runs once per batch up to the last hook any SAE reads; each hook's activation is
computed once and shared by every SAE at that hook. The run folder holds the run's own
files (run_config.yaml with the whole sweep, run_state.json, checkpoints/ with every SAE's
state, log.jsonl with every SAE's lines, metrics.json and summary.csv) and one sub-folder
per SAE, a loadable SAE with its own metrics.json, log.jsonl and train_config.yaml (the
one-SAE config that trains it alone).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from saekit.data.heldout import HeldoutText
from saekit.data.prefetch import Prefetcher
from saekit.errors import DiskFullError
from saekit.models.backend import ModelBackend
from saekit.models.positions import check_context_size
from saekit.preflight import check_train_dtype
from saekit.sites import SAESite
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
)
from saekit.training.periodic_eval import LockedSource
from saekit.training.run import (
    METRICS_FILE,
    NORM_ESTIMATE_BATCHES,
    TrainOutcome,
    _build_sae,
    _check_target_l0,
    _evaluator,
    _json_safe,
    _preflight,
    _read_run_state,
    _seed_everything,
    _wandb_sinks,
    fit_in_run_dir,
    has_checkpoint_to_resume,
    load_run_model,
    open_run_dir,
    periodic_evaluator,
)
from saekit.training.runlog import LOG_FILE, read_log
from saekit.training.sweeps import SAEPlan, plan_saes
from saekit.training.trainer import SAEJob

log = logging.getLogger(__name__)

#: Each SAE's one-SAE config in its sub-folder: `saekit train --config` trains it alone.
#: (Not run_config.yaml: a sub-folder is no run to --resume.)
SAE_CONFIG_FILE = "train_config.yaml"
#: One row per SAE: name, hook, what was swept and the final held-out metrics.
SUMMARY_FILE = "summary.csv"
#: The metrics of the summary table, in order.
SUMMARY_METRICS = ("l0", "explained_variance", "ce_loss_score", "kl_div_score", "dead_fraction")


@dataclass
class ManyOutcome:
    """What `saekit.train` returns for a run of several SAEs."""

    runs: dict[str, TrainOutcome]
    """Each SAE's outcome by name (its `run_dir` is its sub-folder), in the run's order."""
    run_dir: Path
    """The run folder (holding one sub-folder per SAE)."""
    config: TrainConfig
    plans: list[SAEPlan] = field(default_factory=list)
    interrupted: int | None = None
    backend: ModelBackend | None = None
    heldout: HeldoutText | None = None
    is_main: bool = True

    @property
    def metrics(self) -> dict[str, dict[str, Any]]:
        """Final held-out metrics by SAE name."""
        return {name: run.metrics for name, run in self.runs.items()}

    def summary(self) -> list[dict[str, Any]]:
        """One row per SAE: name, hook, the swept settings and the final metrics."""
        rows = []
        for plan in self.plans:
            row: dict[str, Any] = {"name": plan.name, "hook": plan.hook}
            row.update({k.split(".", 1)[1]: v for k, v in plan.settings.items()})
            if self.config.run.seeds or any(p.seed != self.config.run.seed for p in self.plans):
                row["seed"] = plan.seed
            metrics = self.runs[plan.name].metrics if plan.name in self.runs else {}
            row.update({k: metrics.get(k) for k in SUMMARY_METRICS})
            rows.append(row)
        return rows


def train_many(
    cfg: TrainConfig, model: Any, dataset: Any, env: DistEnv, given: Iterable[str] | None
) -> ManyOutcome:
    """Train every SAE of `cfg` (see `saekit.training.sweeps`) from one model pass per batch
    and write the run folder; `saekit.train` calls this for a run of several SAEs."""
    run_dir, resume, parallel = open_run_dir(cfg, env)
    if resume:
        cfg = resumed_config(TrainConfig.load(run_dir / RUN_CONFIG_FILE), cfg, given)
        cfg.run.out = str(run_dir)  # the sub-folders live where the run is now
        resume = has_checkpoint_to_resume(run_dir, env.is_main)
    _refuse_unsupported(cfg)
    _preflight(cfg, model, dataset)
    _seed_everything(cfg.run.seed)

    backend, device = load_run_model(cfg, model, env)
    check_train_dtype(cfg.run.dtype, device)
    check_context_size(backend, cfg.data.context_size)
    # Every hook pattern and SAE name is checked before any text is read.
    plans = plan_saes(cfg, backend.hook_names(), _default_hook(cfg, backend),
                      f"the {getattr(backend, 'name', None) or cfg.data.model} model")
    sites = {p.name: SAESite(*run_hooks(p.config, backend)) for p in plans}
    for plan in plans:
        site = sites[plan.name]
        if site.hook_out == site.hook_in or site.hook_out is None:
            sites[plan.name] = SAESite(site.hook_in, site.hook_in)
    hooks = _hooks_in_order(plans, sites)
    saved_state = _read_run_state(run_dir) if resume else None
    heldout, training_data = heldout_text(cfg, backend, dataset, None, saved_state)
    store = model_or_cache_store(
        cfg, backend, hooks[0], None, training_data, device, env,
        model_given=model is not None, hooks=hooks,
    )
    widths = dict(store.d_in)
    dataset_name = cfg.data.dataset if dataset is None else None
    saes = []
    for plan in plans:
        # Each SAE starts from its own seed, as it would trained alone.
        torch.manual_seed(plan.seed)
        site = sites[plan.name]
        hook_out = site.hook_out if site.hook_out != site.hook_in else None
        source = ActivationSource(store, plan.hook, hook_out, widths)
        saes.append(_build_sae(plan.config, source, device, backend, dataset_name, heldout))
    run_state = saved_state or _new_state(cfg, plans, store, parallel, heldout)
    factors = run_state["norm_scaling_factors"]
    evaluates = env.is_main or parallel.saes_per_rank
    jobs = [
        SAEJob(
            sae, plan.config.training, name=plan.name, hook=plan.hook,
            hook_out=sites[plan.name].hook_out if sae.is_transcoder else None,
            norm_scale=factors[plan.hook] if plan.config.sae.norm_scaling else None,
            evaluate=(
                _evaluator(backend, heldout, plan.hook, sites[plan.name].hook_out)
                if evaluates else None
            ),
        )
        for plan, sae in zip(plans, saes, strict=True)
    ]
    sinks, finish_wandb = _wandb_sinks(cfg) if env.is_main else ([], lambda: None)
    lock = threading.Lock()
    periodic = periodic_evaluator(cfg, backend, heldout, sites, lock)
    stream = store if periodic is None else LockedSource(store, lock)
    source = (
        Prefetcher(stream, depth=PREFETCH_DEPTH, device=device)
        if prefetches(cfg, device) else stream
    )
    result = fit_in_run_dir(
        cfg, jobs, source, run_dir, resume=resume, is_main=env.is_main, run_state=run_state,
        sinks=sinks, finish=finish_wandb, parallel=parallel, periodic=periodic,
    )
    common = dict(backend=backend, heldout=heldout, is_main=env.is_main)
    runs = {
        plan.name: TrainOutcome(
            result.saes[plan.name], {}, run_dir / plan.name, result.interrupted,
            config=plan.config, **common,
        )
        for plan in plans if plan.name in result.saes
    }
    outcome = ManyOutcome(runs, run_dir, cfg, plans, result.interrupted, **common)
    if not env.is_main:
        return outcome
    if result.interrupted is not None:
        _split_log(run_dir, plans)
        return outcome
    for plan in plans:
        metrics = _json_safe(result.metrics.get(plan.name, {}))
        if heldout is not None and metrics:
            metrics["evaluated_on"] = heldout.to_dict()
        _check_target_l0(plan.config, metrics)
        runs[plan.name].metrics = metrics
        _write_sae_folder(run_dir / plan.name, plan, result, metrics)
    _split_log(run_dir, plans)
    (run_dir / METRICS_FILE).write_text(json.dumps(outcome.metrics, indent=2) + "\n")
    write_summary(run_dir / SUMMARY_FILE, outcome.summary())
    for sink in sinks:
        sink({
            f"final/{name}/{k}": v for name, m in outcome.metrics.items()
            for k, v in m.items() if isinstance(v, (int, float))
        })
    return outcome


def _refuse_unsupported(cfg: TrainConfig) -> None:
    if cfg.data.activations is not None:
        raise ValueError(
            "a run of several SAEs reads the model, not an activation cache (--activations); "
            "train from the cache one SAE per run, or drop --activations"
        )
    if cfg.sae.init_from is not None:
        raise ValueError(
            "--init-from fine-tunes one SAE; leave out --hook-name patterns, --layers, "
            "--sweep, --seeds and saes, or start each fine-tuning run on its own"
        )


def _default_hook(cfg: TrainConfig, backend: ModelBackend) -> str | None:
    """The hook a one-SAE run would read (the middle residual stream), None if none."""
    try:
        return run_hooks(TrainConfig(sae=cfg.sae), backend)[0]
    except ValueError:
        return None


def _hooks_in_order(plans: list[SAEPlan], sites: dict[str, SAESite]) -> list[str]:
    """Every hook any SAE reads, each once, in the order the SAEs come."""
    out: list[str] = []
    for plan in plans:
        site = sites[plan.name]
        for hook in (site.hook_in, site.hook_out):
            if hook not in out:
                out.append(hook)
    return out


def _new_state(
    cfg: TrainConfig, plans: list[SAEPlan], store: Any, parallel: Any,
    heldout: HeldoutText | None,
) -> dict[str, Any]:
    """What a resumed run reuses: each hook's norm scaling factor and the held-out count."""
    factors: dict[str, float] = {}
    if any(p.config.sae.norm_scaling for p in plans):
        estimate = store.estimate_norm_scaling_factor(NORM_ESTIMATE_BATCHES)
        found = estimate if isinstance(estimate, dict) else {plans[0].hook: estimate}
        for hook, factor in found.items():
            factor = float(factor)
            if not (math.isfinite(factor) and factor > 0):
                raise ValueError(
                    f"the norm scaling factor estimated at {hook} is {factor}, which cannot "
                    "scale activations; check the data at that hook, or turn norm_scaling off"
                )
            factors[hook] = factor
        factors = parallel.broadcast_object(factors)
    documents = heldout.heldout_documents if heldout is not None else 0
    # norm_scaling_factor: what a one-SAE run's state holds (read by _read_run_state).
    return {"norm_scaling_factor": None, "norm_scaling_factors": factors,
            "heldout_documents": documents}


def _write_sae_folder(folder: Path, plan: SAEPlan, result: Any, metrics: dict[str, Any]) -> None:
    """One SAE's sub-folder: the SAE, its sparsity, metrics.json and train_config.yaml."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        result.saes[plan.name].save(folder, sparsity=result.sparsity[plan.name])
    except DiskFullError as err:
        raise DiskFullError(
            f"{err}. The run's final checkpoint is kept: free some space and finish with "
            f"`saekit train --resume {folder.parent}`", err.path, err.needed,
        ) from err
    (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    plan.config.save(folder / SAE_CONFIG_FILE)


def _split_log(run_dir: Path, plans: list[SAEPlan]) -> None:
    """Each SAE's log.jsonl from the run's: its own lines, without the name prefix, and its
    own periodic evaluations. Rewritten whole each time, so a resumed run's stays exact."""
    path = run_dir / LOG_FILE
    records = read_log(run_dir) if path.is_file() else []
    for plan in plans:
        prefix = f"{plan.name}/"
        lines = []
        for record in records:
            own: dict[str, Any] = {"step": record.get("step"), "tokens": record.get("tokens")}
            if "eval" in record:
                found = record["eval"].get(plan.name)
                if found is None:
                    continue
                own["eval"] = found
            else:
                own.update({k[len(prefix):]: v for k, v in record.items() if k.startswith(prefix)})
                if len(own) == 2:
                    continue
            lines.append(json.dumps(own))
        folder = run_dir / plan.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / LOG_FILE).write_text("".join(line + "\n" for line in lines))


def write_summary(path: Path, rows: list[dict[str, Any]]) -> None:
    """The summary table as CSV (one row per SAE)."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in row.items()})


def _cell(value: Any) -> Any:
    if isinstance(value, list):
        return "+".join(str(v) for v in value)
    return "" if value is None else value


def format_summary(rows: list[dict[str, Any]]) -> str:
    """The summary table as aligned text, one row per SAE (figures to 4 significant
    digits)."""
    if not rows:
        return ""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns and k != "name")
    columns = ["name", *columns]

    def show(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "-" if value is None else _cell(value) if isinstance(value, list) else str(value)

    table = [[c for c in columns]] + [[show(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in table
    )
