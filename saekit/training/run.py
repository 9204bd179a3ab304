"""`saekit.train`: a whole run from a TrainConfig, model and text to a finished run folder.

This is the one place that joins the pieces: model backend, activation store, SAE, trainer,
evaluator and run folder. The trainer itself sees only tensors.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saekit.config import SAEConfig, SAEMetadata
from saekit.data.heldout import HeldoutText
from saekit.data.prefetch import Prefetcher
from saekit.errors import DiskFullError, SaekitError
from saekit.io.native import remove_partial_writes
from saekit.models.backend import ModelBackend
from saekit.models.positions import check_context_size
from saekit.preflight import check_train_dtype
from saekit.saes import SAE, architecture_class
from saekit.sites import SAESite
from saekit.training.activations import (
    ActivationSource,
    activation_source,
    cache_metadata,
)
from saekit.training.cache_source import (
    PREFETCH_DEPTH,
    prefetches,
    refuse_cache_under_torchrun,
)
from saekit.training.checkpoint import latest_checkpoint, remove_partial_checkpoints
from saekit.training.config import (
    RUN_CONFIG_FILE,
    TrainConfig,
    resumed_config,
)
from saekit.training.distributed import (
    DistEnv,
    Parallelism,
    init_process_group,
    local_device,
    make_parallelism,
)
from saekit.training.init_from import (
    INIT_KEY,
    InitSource,
    load_init_source,
    resolve_config,
    resumed_sae,
    state_record,
    training_start,
)
from saekit.training.periodic_eval import LockedSource, PeriodicEval, heldout_sample
from saekit.training.trainer import FitResult, SAEJob, Trainer

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
#: Values fixed when the run started that a resumed run must reuse (e.g. the norm factor).
RUN_STATE_FILE = "run_state.json"
#: Batches read to estimate the activation norm scaling factor.
NORM_ESTIMATE_BATCHES = 5
#: How far (relative) the final held-out L0 may be from target_l0 before the run warns.
L0_TOLERANCE = 0.10


@dataclass
class TrainOutcome:
    """What `saekit.train` returns."""

    sae: SAE
    """The trained SAE (as saved: folded, published form), or the partly trained one when
    the run was interrupted."""
    metrics: dict[str, Any]
    """Final held-out metrics (also in metrics.json); empty when interrupted."""
    run_dir: Path
    """The run folder (loadable with SAE.load when the run finished)."""
    interrupted: int | None = None
    """The signal that stopped the run early, else None."""
    config: TrainConfig | None = None
    """The config the run followed (on resume: the saved one, with the changes allowed)."""
    backend: ModelBackend | None = None
    """The model backend the run read (reused by the report, so the model loads once)."""
    heldout: HeldoutText | None = None
    """The held-out text of the final evaluation (None when eval_tokens is 0)."""
    is_main: bool = True
    """False on every torchrun rank but 0, which alone writes results and reports."""


def _train(
    cfg: TrainConfig, model: Any, dataset: Any, env: DistEnv, given: Iterable[str] | None
) -> TrainOutcome:
    refuse_cache_under_torchrun(cfg, env)
    source: InitSource | None = None
    if cfg.sae.init_from is not None and cfg.run.resume is None:
        # Before any folder, model or text: the SAE a fine-tuning run starts from says what
        # the run trains, and settings given that contradict it fail here.
        source = load_init_source(cfg.sae.init_from)
        cfg = resolve_config(cfg, source, given)
    # A missing, unfinished or too small cache fails before any folder or model is touched
    # (on resume, once the saved config has said which cache the run reads).
    cache_meta = cache_metadata(cfg) if cfg.run.resume is None else None
    # Under torchrun every rank trains on its share of each global batch; rank 0 alone
    # checks and writes the run folder, and the others wait until it is ready.
    run_dir, resume, parallel = open_run_dir(cfg, env)
    if resume:
        cfg = resumed_config(TrainConfig.load(run_dir / RUN_CONFIG_FILE), cfg, given)
        cache_meta = cache_metadata(cfg)
        resume = has_checkpoint_to_resume(run_dir, env.is_main)
    if not resume and cfg.sae.init_from is not None and source is None:
        # A fine-tuning run that stopped before its first checkpoint starts from its source.
        source = load_init_source(cfg.sae.init_from)
        cfg = resolve_config(cfg, source, ())
    _preflight(cfg, model, dataset)
    _seed_everything(cfg.run.seed)

    backend, device = load_run_model(cfg, model, env)
    check_train_dtype(cfg.run.dtype, device)
    check_context_size(backend, cfg.data.context_size)
    saved_state = _read_run_state(run_dir) if resume else None
    if cfg.sae.init_from is not None:
        # The SAE's widths against the model's, before any text is read.
        _check_init_widths(cfg, backend, cache_meta, source, saved_state)
    activations, heldout = activation_source(
        cfg, backend, dataset, cache_meta, saved_state, device, env, model is not None
    )
    hook, hook_out = activations.hook, activations.hook_out
    dataset_name = cfg.data.dataset if dataset is None else None
    if cfg.sae.init_from is None:
        sae = _build_sae(cfg, activations, device, backend, dataset_name, heldout)
        run_state = saved_state or _new_run_state(cfg, activations, parallel, heldout)
    else:
        sae, run_state = _fine_tuning_sae(
            cfg, activations, device, backend, dataset_name, heldout, parallel, source,
            saved_state,
        )
    job = SAEJob(
        sae,
        cfg.training,
        hook=hook,
        hook_out=hook_out if sae.is_transcoder else None,
        norm_scale=run_state["norm_scaling_factor"],
        evaluate=_evaluator(backend, heldout, hook, hook_out) if env.is_main else None,
        keep_weights=cfg.sae.init_from is not None,
    )
    sinks, finish_wandb = _wandb_sinks(cfg) if env.is_main else ([], lambda: None)
    lock = threading.Lock()
    sites = {job.name: SAESite(hook, job.hook_out or hook)}
    periodic = periodic_evaluator(cfg, backend, heldout, sites, lock)
    store = activations.store if periodic is None else LockedSource(activations.store, lock)
    overlap = prefetches(cfg, device)
    source = Prefetcher(store, depth=PREFETCH_DEPTH, device=device) if overlap else store
    result = fit_in_run_dir(
        cfg, job, source, run_dir, resume=resume, is_main=env.is_main, run_state=run_state,
        sinks=sinks, finish=finish_wandb, parallel=parallel, periodic=periodic,
    )
    return finish_one_sae_run(cfg, result, run_dir, backend, heldout, env.is_main, sinks)


def open_run_dir(cfg: TrainConfig, env: DistEnv) -> tuple[Path, bool, Parallelism]:
    """(run folder, whether it resumes, the run's parallelism), as every kind of run starts.

    Under torchrun this joins the process group; rank 0 alone checks the folder
    (`_prepare_run_dir`: a resumed run's must hold its config, a new run's must be free or
    --overwrite given) while the other ranks wait at a barrier until it is ready. A resumed
    run's caller then loads the saved config and asks `has_checkpoint_to_resume`."""
    if env.distributed:
        init_process_group(str(local_device(_device(cfg.run.device), env)), env)
    parallel = make_parallelism(cfg.run.parallel)
    if env.is_main:
        run_dir, resume = _prepare_run_dir(cfg)
    else:
        resume = cfg.run.resume is not None
        run_dir = Path(cfg.run.resume if resume else cfg.run.out)
    parallel.barrier()
    return run_dir, resume, parallel


def has_checkpoint_to_resume(run_dir: Path, is_main: bool) -> bool:
    """Whether the resumed run in `run_dir` continues from a checkpoint; first (rank 0 only)
    clears what a kill mid-save left half written. A run stopped before its first checkpoint
    has nothing to continue, so it starts again from the beginning (and says so)."""
    if is_main:
        remove_partial_writes(run_dir)
        remove_partial_checkpoints(run_dir)
    if latest_checkpoint(run_dir) is not None:
        return True
    if is_main:
        log.info("%s holds no checkpoint yet; starting the run from the beginning", run_dir)
    return False


def finish_one_sae_run(
    cfg: TrainConfig,
    result: FitResult,
    run_dir: Path,
    backend: ModelBackend,
    heldout: HeldoutText | None,
    is_main: bool,
    sinks: list[Any],
    extra_metrics: Callable[[SAE], dict[str, Any]] | None = None,
) -> TrainOutcome:
    """The outcome of a finished (or interrupted) run of one SAE, the trainer's job "sae".

    Rank 0 of a run that finished writes its results (`write_results`): the final held-out
    metrics (NaN as null), what they were evaluated on, and `extra_metrics(trained)` merged
    in; it warns when the held-out L0 missed target_l0. An interrupted run and the other
    ranks write nothing and return no metrics."""
    trained = result.saes["sae"]
    outcome = dict(config=cfg, backend=backend, heldout=heldout, is_main=is_main)
    if result.interrupted is not None:
        return TrainOutcome(trained, {}, run_dir, result.interrupted, **outcome)
    if not is_main:
        return TrainOutcome(trained, {}, run_dir, **outcome)
    metrics = _json_safe(result.metrics["sae"])
    if heldout is not None and metrics:
        metrics["evaluated_on"] = heldout.to_dict()
    if extra_metrics is not None:
        metrics.update(extra_metrics(trained))
    _check_target_l0(cfg, metrics)
    write_results(run_dir, trained, result.sparsity["sae"], metrics, sinks)
    return TrainOutcome(trained, metrics, run_dir, **outcome)


def saved_run_config(cfg: TrainConfig) -> TrainConfig | None:
    """The config saved in the run folder `cfg` resumes, None when it resumes none (or the
    folder holds no config: `_prepare_run_dir` then refuses it with the reason). Says what
    kind of run a bare `--resume` continues."""
    if cfg.run.resume is None:
        return None
    saved = Path(cfg.run.resume) / RUN_CONFIG_FILE
    return TrainConfig.load(saved) if saved.is_file() else None


def load_run_model(cfg: TrainConfig, model: Any, env: DistEnv) -> tuple[ModelBackend, str]:
    """(the run's model backend, the device its SAE trains on): `model` when the caller
    built one (it stays where they put it unless a device is asked for), else
    `cfg.data.model` loaded onto the run's model device."""
    from saekit.models import load_model

    model_device = cfg.run.model_device
    if model is not None:
        backend = load_model(
            model, backend=cfg.data.backend, device=model_device or cfg.run.device
        )
        device = cfg.run.device or str(backend.device)
    else:
        device = _device(cfg.run.device)
        backend = load_model(
            cfg.data.model, backend=cfg.data.backend, device=model_device or device,
            device_map=cfg.data.device_map,
        )
    return backend, str(local_device(device, env))


def write_results(
    run_dir: Path, trained: SAE, sparsity: Any, metrics: dict[str, Any], sinks: list[Any]
) -> None:
    """A finished run's outputs in its folder: the SAE (with its sparsity) and
    metrics.json; the metrics' numbers also go to the log sinks as final/NAME."""
    try:
        trained.save(run_dir, sparsity=sparsity)
    except DiskFullError as err:
        raise DiskFullError(
            f"{err}. The run's final checkpoint is kept: free some space and finish with "
            f"`saekit train --resume {run_dir}`", err.path, err.needed,
        ) from err
    (run_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    for sink in sinks:
        sink({f"final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})


def _check_target_l0(cfg: TrainConfig, metrics: dict[str, Any]) -> None:
    """Say so when the controller did not bring the held-out L0 within 10% of the target."""
    target, l0 = cfg.training.target_l0, metrics.get("l0")
    if target is None or l0 is None or cfg.sae.sets_k:
        return
    if abs(l0 - target) > L0_TOLERANCE * target:
        steps = cfg.training.tokens // cfg.training.batch_size
        log.warning(
            "held-out L0 is %.1f, not within %d%% of target_l0=%g after %d steps: the "
            "controller needs enough optimiser steps for the SAE to follow it (Adam moves each "
            "weight by about lr per step); give it more steps (a smaller batch_size or more "
            "tokens) or a higher lr, or start sparsity_coefficient near the last "
            "sparsity_coefficient in log.jsonl",
            l0, round(100 * L0_TOLERANCE), target, steps,
        )


def _as_config(config: TrainConfig | dict[str, Any] | str | Path | None) -> TrainConfig:
    if config is None:
        return TrainConfig()
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, dict):
        return TrainConfig.from_dict(config)
    return TrainConfig.load(config)


def _prepare_run_dir(cfg: TrainConfig) -> tuple[Path, bool]:
    if cfg.run.resume is not None:
        run_dir = Path(cfg.run.resume)
        if not (run_dir / RUN_CONFIG_FILE).is_file():
            raise FileNotFoundError(
                f"{run_dir} is not a saekit run folder (no {RUN_CONFIG_FILE}); --resume takes "
                "the folder a previous `saekit train` wrote"
            )
        return run_dir, True
    run_dir = Path(cfg.run.out)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        if not cfg.run.overwrite:
            raise FileExistsError(
                f"output folder {run_dir} already exists; pass --resume {run_dir} to continue "
                "that run, --overwrite to replace it, or choose another --out"
            )
        # --overwrite: the old folder goes only once the new run is ready to write its own
        # (`_start_run_dir`), so a start that fails on a bad input leaves it as it was.
    return run_dir, False


def _start_run_dir(run_dir: Path, replace: bool) -> bool:
    """Create the run's folder (with `replace`, a new run's, first removing what --overwrite
    allowed); True when this start created it, so a start that fails before its first
    checkpoint removes it again."""
    if replace and run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        if run_dir.is_dir():
            shutil.rmtree(run_dir)
        else:
            run_dir.unlink()
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    return created


def _preflight(cfg: TrainConfig, model: Any, dataset: Any) -> None:
    """What can be checked before a model loads: the devices exist, the SAE's dtype trains
    on its device, and local text files are there and readable as text."""
    from saekit.preflight import check_device, check_local_dataset, check_train_dtype

    check_device(cfg.run.device, "--device")
    check_device(cfg.run.model_device, "--model-device")
    if model is None or cfg.run.device is not None:
        check_train_dtype(cfg.run.dtype, _device(cfg.run.device))
    if dataset is None and cfg.data.activations is None:
        check_local_dataset(cfg.data.dataset, "--dataset")
    if cfg.data.eval_dataset is not None:
        check_local_dataset(cfg.data.eval_dataset, "--eval-dataset")


def _read_run_state(run_dir: Path) -> dict[str, Any]:
    """The run's saved run_state.json, refusing a damaged one by name."""
    file = run_dir / RUN_STATE_FILE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{file} is missing, so the run cannot resume with the values it started with "
            "(the norm scaling factor, the held-out documents); start it again with --overwrite"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{file} is not valid JSON ({err}); the run folder is damaged, so start the run "
            "again with --overwrite"
        ) from None
    if not isinstance(state, dict) or "norm_scaling_factor" not in state:
        raise ValueError(
            f"{file} does not hold a run state (a JSON object with norm_scaling_factor); "
            "the run folder is damaged, so start the run again with --overwrite"
        )
    return state


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _device(name: str | None) -> str:
    if name is not None:
        return name
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        found = accelerator.current_accelerator()
        if found is not None:
            return found.type
    return "cpu"


def _build_sae(
    cfg: TrainConfig,
    activations: ActivationSource,
    device: str,
    backend: ModelBackend,
    dataset_name: str | None,
    heldout: HeldoutText | None,
) -> SAE:
    hook, hook_out = activations.hook, activations.hook_out
    d_in = activations.widths[hook]
    d_out = activations.widths.get(hook_out) if hook_out is not None else None
    s = cfg.sae
    d_sae = s.d_sae or s.expansion_factor * d_in
    # The architecture's defaults (k, nested widths, ...), then what the user set.
    fields = architecture_class(s.architecture).config_defaults(
        d_in, d_sae, cfg.training.target_l0
    )
    fields.update({name: getattr(s, name) for name in ("k", "matryoshka_widths")
                   if getattr(s, name) is not None})
    if (fields.get("k") or 0) > d_sae:
        raise ValueError(f"k={fields['k']} is larger than d_sae={d_sae}; lower k or widen the SAE")
    fields["apply_b_dec_to_input"] = s.apply_b_dec_to_input and (d_out is None or d_out == d_in)
    sae_cfg = SAEConfig(
        architecture=s.architecture,
        d_in=d_in,
        d_sae=d_sae,
        dtype=cfg.run.dtype,
        device=device,
        d_out=d_out,
        metadata=_run_metadata(cfg, activations, backend, dataset_name, heldout),
        **fields,
    )
    return SAE.from_config(sae_cfg)


def _run_metadata(
    cfg: TrainConfig,
    activations: ActivationSource,
    backend: ModelBackend,
    dataset_name: str | None,
    heldout: HeldoutText | None,
) -> SAEMetadata:
    """What the trained SAE records of the run: model, hook(s), framing and data."""
    from saekit.data.tokens import sequence_framing

    hook, hook_out = activations.hook, activations.hook_out
    framing = sequence_framing(backend.tokenizer, cfg.data.prepend_bos)[0]
    metadata = SAEMetadata(
        model_name=getattr(backend, "name", None) or cfg.data.model,
        hook_name=hook,
        hook_name_out=hook_out,
        context_size=cfg.data.context_size,
        prepend_bos=framing == "bos",
        dataset_path=dataset_name,
    )
    # Later steps (eval, dashboard) frame text as training did (SAEMetadata docs), and
    # `saekit eval` on the training dataset reads the documents the run held out.
    if framing == "tokenizer":
        metadata.extra["sequence_framing"] = framing
    if heldout is not None and heldout.split is None:
        metadata.extra["heldout_documents"] = heldout.heldout_documents
    return metadata


def _fine_tuning_sae(
    cfg: TrainConfig,
    activations: ActivationSource,
    device: str,
    backend: ModelBackend,
    dataset_name: str | None,
    heldout: HeldoutText | None,
    parallel: Parallelism,
    source: InitSource | None,
    saved_state: dict[str, Any] | None,
) -> tuple[SAE, dict[str, Any]]:
    """(the SAE, the run state) of a fine-tuning run: the source's weights on the run's
    scaled activations, or, resuming, an SAE of the saved shape for the checkpoint to fill.
    The trained SAE's metadata and run_state.json record the source (`INIT_KEY`)."""
    metadata = _run_metadata(cfg, activations, backend, dataset_name, heldout)
    if saved_state is not None:
        record = _saved_init_record(saved_state)
        metadata.extra[INIT_KEY] = {k: v for k, v in record.items() if k != "sae_config"}
        sae = resumed_sae(record["sae_config"], metadata, cfg.run.dtype, device)
        return sae, saved_state
    assert source is not None  # loaded by _train for every fine-tuning start
    metadata.extra[INIT_KEY] = source.record()
    # The norm factor first: the source's weights are re-expressed on activations scaled
    # by it.
    run_state = _new_run_state(cfg, activations, parallel, heldout)
    sae = training_start(
        source, metadata, cfg.run.dtype, device, run_state["norm_scaling_factor"],
        cfg.training.decoder_norm,
    )
    run_state[INIT_KEY] = state_record(source, sae)
    return sae, run_state


def _saved_init_record(state: dict[str, Any]) -> dict[str, Any]:
    record = state.get(INIT_KEY)
    if not isinstance(record, dict) or not isinstance(record.get("sae_config"), dict):
        raise ValueError(
            f"{RUN_STATE_FILE} of this fine-tuning run has no {INIT_KEY} record with the "
            "SAE's config, so the run cannot be resumed; start it again with --overwrite"
        )
    return record


def _check_init_widths(
    cfg: TrainConfig,
    backend: ModelBackend,
    cache_meta: dict[str, Any] | None,
    source: InitSource | None,
    saved_state: dict[str, Any] | None,
) -> None:
    """Refuse a model whose widths at the run's hook(s) are not the fine-tuned SAE's."""
    from saekit.preflight import check_hook_widths
    from saekit.training.activations import run_hooks

    if source is not None:
        d_in, d_out = source.sae.cfg.d_in, source.sae.cfg.output_width
        transcoder, name = source.sae.is_transcoder, source.spec
    else:
        saved = _saved_init_record(saved_state or {})["sae_config"]
        d_in, d_out = saved["d_in"], saved.get("d_out") or saved["d_in"]
        transcoder = architecture_class(saved["architecture"]).is_transcoder
        name = str(cfg.sae.init_from)
    hook, hook_out = run_hooks(cfg, backend, cache_meta)
    widths = {hook: d_in}
    if transcoder and hook_out is not None:
        widths[hook_out] = d_out
    check_hook_widths(backend, widths, f"the SAE of --init-from {name}")


def _new_run_state(
    cfg: TrainConfig,
    activations: ActivationSource,
    parallel: Parallelism,
    heldout: HeldoutText | None,
) -> dict[str, Any]:
    """What a resumed run must reuse: the norm scaling factor and the documents held out."""
    factor = None
    hook = activations.hook
    if cfg.sae.norm_scaling:
        estimate = activations.store.estimate_norm_scaling_factor(NORM_ESTIMATE_BATCHES)
        # Transcoders: one factor (the input's) for input and target, so that folding it
        # into the weights at the end is exact.
        factor = float(estimate[hook] if isinstance(estimate, dict) else estimate)
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(
                f"the norm scaling factor estimated at {hook} is {factor}, which cannot scale "
                "activations; check the data at that hook, or turn norm_scaling off"
            )
        # Every rank estimated on its own shard; all use rank 0's, which is the one saved.
        factor = parallel.broadcast_object(factor)
    documents = heldout.heldout_documents if heldout is not None else 0
    return {"norm_scaling_factor": factor, "heldout_documents": documents}


def _evaluator(
    backend: ModelBackend, heldout: HeldoutText | None, hook: str, hook_out: str | None
) -> Any:
    if heldout is None:
        return None
    from saekit.evals import make_evaluator

    return make_evaluator(backend, heldout.batches, hook=hook, hook_out=hook_out)


def periodic_evaluator(
    cfg: TrainConfig,
    backend: ModelBackend,
    heldout: HeldoutText | None,
    sites: dict[str, SAESite],
    lock: threading.Lock,
) -> PeriodicEval | None:
    """The run's evaluation every `run.eval_every` tokens (None when it has none), on the
    first `run.eval_every_tokens` tokens of the held-out text."""
    if cfg.run.eval_every is None or heldout is None:
        return None
    sample = heldout_sample(heldout.batches, cfg.run.eval_every_tokens)
    return PeriodicEval(cfg.run.eval_every, backend, sample, sites, lock=lock)


def flat_record(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A log record with nested mappings flattened to "eval/NAME/l0" keys (for W&B)."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(flat_record(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = value
    return out


def _wandb_sinks(cfg: TrainConfig) -> tuple[list[Any], Any]:
    if not cfg.run.wandb:
        return [], lambda: None
    try:
        import wandb
    except ImportError as err:
        raise ValueError("--wandb needs the wandb package: pip install wandb") from err
    try:
        run = wandb.init(project=cfg.run.wandb_project, config=cfg.to_dict())
    except wandb.errors.Error as err:  # not logged in, no network, a bad project name
        raise SaekitError(
            f"--wandb: Weights & Biases would not start a run ({err}); log in with "
            "`wandb login` (or set WANDB_API_KEY), set WANDB_MODE=offline, or drop --wandb"
        ) from err
    return [lambda record: run.log(flat_record(record))], run.finish


def _json_safe(metrics: dict[str, Any]) -> dict[str, Any]:
    from saekit.evals.metrics import json_safe

    return json_safe(metrics)


def fit_in_run_dir(
    cfg: TrainConfig,
    jobs: SAEJob | list[SAEJob],
    source: Any,
    run_dir: Path,
    *,
    resume: bool,
    is_main: bool,
    run_state: dict[str, Any],
    sinks: Any,
    finish: Callable[[], None],
    parallel: Any,
    periodic: Any,
) -> FitResult:
    """Train `jobs` on `source` with checkpoints in `run_dir`. A fresh run's folder, config
    and state are written first; a start that fails before its first checkpoint leaves no
    folder behind; `finish` (W&B) and a prefetching source are closed however it ends."""
    trainer = Trainer(
        jobs,
        source,
        run_dir,
        checkpoint_every=cfg.run.checkpoint_every or max(cfg.training.tokens // 10, 1),
        keep_checkpoints=cfg.run.keep_checkpoints,
        log_every=cfg.run.log_every,
        progress=cfg.run.progress,
        log_sinks=sinks,
        parallel=parallel,
        periodic_eval=periodic,
    )
    created = False
    try:
        if not resume and is_main:
            # A resumed run that had no checkpoint starts again in its own folder.
            created = _start_run_dir(run_dir, replace=cfg.run.resume is None)
            cfg.save(run_dir / RUN_CONFIG_FILE)
            (run_dir / RUN_STATE_FILE).write_text(json.dumps(run_state, indent=2) + "\n")
        return trainer.fit(resume=resume)
    except BaseException:
        if created and latest_checkpoint(run_dir) is None:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        finish()
        if isinstance(source, Prefetcher):
            source.close()
