"""SAELens training configs (`LanguageModelSAERunnerConfig`, as JSON or YAML) read as saekit's.

`saekit train --config saelens_cfg.json` accepts the dict SAELens 6 writes with
`cfg.to_dict()` (runner fields at the top, the SAE's under `sae`) and the flat layout of
earlier versions (SAE fields at the top). Each field is, in one of four ways:

- translated to the saekit setting of the same meaning (`TRANSLATED` plus the fields with
  their own rule below), converting SAELens's step counts to saekit's token counts;
- accepted only at the values where saekit does what SAELens would (`FIXED`);
- ignored, when it changes nothing saekit computes: logging, performance, where
  checkpoints go, version stamps (`IGNORED`);
- refused: any other value, and unknown fields. Every refusal is reported at once, in one
  line naming the fields.

A field that is absent takes saekit's default, not SAELens's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from saekit.errors import SaekitError

if TYPE_CHECKING:
    from saekit.training.config import TrainConfig

#: SAELens's train_batch_size_tokens default, which saekit's batch_size default equals:
#: the size that converts step counts to tokens when the config gives none.
DEFAULT_BATCH_TOKENS = 4096

#: {SAELens field: saekit setting} for fields of the same meaning and unit.
TRANSLATED: dict[str, str] = {
    "model_name": "data.model",
    "hook_name": "data.hook_name",
    "dataset_path": "data.dataset",
    "context_size": "data.context_size",
    "prepend_bos": "data.prepend_bos",
    "eval_dataset_path": "data.eval_dataset",
    "training_tokens": "training.tokens",
    "train_batch_size_tokens": "training.batch_size",
    "lr": "training.lr",
    "l1_coefficient": "training.sparsity_coefficient",
    "l0_coefficient": "training.sparsity_coefficient",
    "jumprelu_bandwidth": "training.threshold_bandwidth",
    "jumprelu_sparsity_loss_mode": "training.threshold_penalty",
    "aux_loss_coefficient": "training.aux_k_coefficient",
    "b_dec_init_method": "training.b_dec_init",
    "d_sae": "sae.d_sae",
    "expansion_factor": "sae.expansion_factor",
    "apply_b_dec_to_input": "sae.apply_b_dec_to_input",
    "seed": "run.seed",
    "device": "run.device",
    "llm_device": "run.model_device",
    "output_path": "run.out",
    "log_to_wandb": "run.wandb",
    "wandb_project": "run.wandb_project",
    "wandb_log_frequency": "run.log_every",
}

#: {SAELens field: saekit setting} for counts of training steps, which saekit counts in
#: tokens (steps x train_batch_size_tokens).
STEP_COUNTS: dict[str, str] = {
    "lr_warm_up_steps": "training.lr_warmup_tokens",
    "l1_warm_up_steps": "training.sparsity_warmup_tokens",
    "l0_warm_up_steps": "training.sparsity_warmup_tokens",
    "dead_feature_window": "training.dead_after_tokens",
}

#: {SAELens field: (the values saekit honours, what saekit does)}.
FIXED: dict[str, tuple[tuple[Any, ...], str]] = {
    "adam_beta1": ((0.9,), "saekit's Adam uses beta1 0.9"),
    "adam_beta2": ((0.999,), "saekit's Adam uses beta2 0.999"),
    "n_restart_cycles": ((1,), "saekit's schedules do not restart"),
    "use_chat_formatting": ((False,), "saekit tokenizes plain text"),
    "use_cached_activations": ((False,), "saekit reads caches written by `saekit cache` "
                               "(data.activations), not SAELens's"),
    "from_pretrained_path": ((None,), "saekit trains SAEs from a fresh start"),
    "resume_from_checkpoint": ((None,), "saekit resumes its own runs: --resume RUN_FOLDER"),
    "hook_head_index": ((None,), "saekit trains on the whole hook, heads flattened"),
    "seqpos_slice": (((None,), (None, None), None), "saekit trains on every position"),
    "disable_concat_sequences": ((False,), "saekit packs documents into full windows"),
    "model_kwargs": (({}, None), "saekit runs the model's plain forward pass"),
    "model_from_pretrained_kwargs": (
        (None, {}, {"center_writing_weights": False}),
        "saekit loads models with the loader's own defaults",
    ),
    "sequence_separator_token": (
        ("bos", "eos"),
        "saekit puts the tokenizer's EOS (BOS where it has none) between packed documents",
    ),
    "exclude_special_tokens": (
        (True, False), "saekit never trains on special tokens' activations",
    ),
    "reshape_activations": (("none",), "saekit trains on per-head hooks flattened"),
    "lp_norm": ((1, 1.0), "saekit's standard SAE penalises the L1 norm"),
    "jumprelu_tanh_scale": ((4, 4.0), "saekit's tanh penalty uses scale 4"),
    # 0.01 is SAELens 6's default, read as no preference; 0.001 is saekit's start.
    "jumprelu_init_threshold": ((0.01, 0.001), "saekit starts thresholds at 0.001"),
    "pre_act_loss_coefficient": (
        (None,), "saekit's threshold_pre_act_coefficient weighs every latent, not only dead "
        "ones; set it in a saekit config",
    ),
    "topk_threshold_lr": ((0.01,), "saekit's batchtopk threshold average moves at rate 0.01"),
    "use_matryoshka_aux_loss": ((False,), "saekit's AuxK covers the whole SAE"),
}

#: {SAELens field: why saekit ignores it}; documented in docs/coming-from-saelens.md.
IGNORED: dict[str, str] = {
    **dict.fromkeys(
        ("run_name", "wandb_entity", "wandb_id", "log_activations_store_to_wandb",
         "log_optimizer_state_to_wandb", "log_weights_to_wandb", "eval_every_n_wandb_logs",
         "feature_sampling_window", "dead_feature_threshold", "n_eval_batches",
         "eval_batch_size_prompts", "verbose"),
        "logging",
    ),
    **dict.fromkeys(
        ("n_batches_in_buffer", "store_batch_size_prompts", "activations_mixing_fraction",
         "act_store_device", "prefetch_llm_batches", "autocast", "autocast_lm", "compile_llm",
         "llm_compilation_mode", "compile_sae", "sae_compilation_mode",
         "n_batches_for_norm_estimate", "use_sparse_activations", "streaming",
         "tokens_per_buffer"),
        "performance",
    ),
    "checkpoint_path": "files: checkpoints go into the run folder",
    "save_final_checkpoint": "files: the run folder holds the final SAE",
    "cached_activations_path": "read only with use_cached_activations",
    "dataset_trust_remote_code": "permission: saekit runs no dataset scripts",
    "eval_dataset_trust_remote_code": "permission: saekit runs no dataset scripts",
    "is_dataset_tokenized": "saekit detects token columns itself",
    "d_in": "saekit reads the width from the model",
    "metadata": "saekit writes the SAE's metadata from the run",
    "hook_eval": "unused by SAELens too",
    "sae_lens_version": "version stamp",
    "sae_lens_training_version": "version stamp",
}

#: Fields of the runner config that mark a dict as SAELens's (saekit's files have sections).
RUNNER_MARKERS = frozenset(
    {"model_name", "hook_name", "dataset_path", "training_tokens", "train_batch_size_tokens",
     "context_size", "model_class_name", "l1_coefficient", "d_in", "logger"}
)
SAEKIT_SECTIONS = frozenset({"sae", "data", "training", "run"})
MODEL_CLASSES = {"HookedTransformer": "transformer_lens", "AutoModelForCausalLM": "hf"}
SCHEDULES = {"constant": "constant", "cosineannealing": "cosine"}
NORMALIZE_MODES = {"none": False, "expected_average_only_in": True}
LOGGER_FIELDS = ("log_to_wandb", "wandb_project", "wandb_log_frequency")


class SAELensConfigError(SaekitError, ValueError):
    """A SAELens config asking for what saekit does not do; `fields` names each field."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.fields = [name for name, _ in problems]
        super().__init__(
            "this SAELens config asks for what saekit does not do: "
            + "; ".join(text for _, text in problems)
            + ". Remove or change these fields (docs/coming-from-saelens.md says how each "
            "field translates)"
        )


def is_saelens_config(data: Any) -> bool:
    """Whether a config file's mapping is a SAELens runner config, not saekit's sections."""
    if not isinstance(data, dict) or set(data) <= SAEKIT_SECTIONS:
        return False
    sae = data.get("sae")
    return bool(RUNNER_MARKERS & set(data)) or (isinstance(sae, dict) and "d_in" in sae)


def _show(value: Any) -> str:
    """A value as the config file would write it (JSON)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _same(value: Any, accepted: Any) -> bool:
    """Equality that takes a JSON list for a tuple and 1 for 1.0, but no bool for a number."""
    if isinstance(value, (list, tuple)) and isinstance(accepted, (list, tuple)):
        return len(value) == len(accepted) and all(map(_same, value, accepted))
    if isinstance(value, bool) or isinstance(accepted, bool):
        return value is accepted
    if isinstance(value, (int, float)) and isinstance(accepted, (int, float)):
        return value == accepted
    return type(value) is type(accepted) and value == accepted


class _Translation:
    """The saekit sections built so far, and the fields refused."""

    def __init__(self, fields: dict[str, Any], names: dict[str, str]) -> None:
        self.fields = fields
        self.names = names  # field -> how the user wrote it ("sae.k" for a nested field)
        self.sections: dict[str, dict[str, Any]] = {}
        self.problems: list[tuple[str, str]] = []
        batch = fields.get("train_batch_size_tokens")
        self.batch = batch if isinstance(batch, int) and batch > 0 else DEFAULT_BATCH_TOKENS

    def set(self, setting: str, value: Any) -> None:
        section, name = setting.split(".")
        self.sections.setdefault(section, {})[name] = value

    def refuse(self, field: str, why: str) -> None:
        name = self.names.get(field, field)
        self.problems.append((name, f"{name}={_show(self.fields.get(field))} ({why})"))

    def total_steps(self) -> int:
        from saekit.training.config import TrainingSection

        tokens = self.fields.get("training_tokens")
        if not isinstance(tokens, int) or tokens <= 0:  # the config's check reports a bad one
            tokens = TrainingSection().tokens
        return max(tokens // self.batch, 1)


def _architecture(t: _Translation, value: Any) -> None:
    if not isinstance(value, str):
        t.refuse("architecture", "an architecture name is a string")
        return
    name = value.lower()
    if t.fields.get("activation_fn") == "topk" and name == "standard":
        name = "topk"  # the flat layout's spelling of a topk SAE
    t.set("sae.architecture", name)


def _activation_fn(t: _Translation, value: Any) -> None:
    if value not in ("relu", "topk", None):
        t.refuse("activation_fn", "saekit's SAEs are chosen by architecture: relu or topk")


def _activation_fn_kwargs(t: _Translation, value: Any) -> None:
    extra = set(value or {}) - {"k"}
    if extra:
        t.refuse("activation_fn_kwargs", f"only k translates, not {', '.join(sorted(extra))}")
    elif value and "k" in value:
        _k(t, value["k"])


def _k(t: _Translation, value: Any) -> None:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        t.refuse("k", "saekit's k is a whole number of latents")
        return
    t.set("sae.k", value)


def _matryoshka_widths(t: _Translation, value: Any) -> None:
    widths = list(value or [])
    d_sae = t.fields.get("d_sae")
    if widths and isinstance(d_sae, int) and widths[-1] != d_sae:
        widths.append(d_sae)  # SAELens adds the full width as the last level too
    t.set("sae.matryoshka_widths", widths)


def _model_class_name(t: _Translation, value: Any) -> None:
    if value not in MODEL_CLASSES:
        t.refuse("model_class_name", f"saekit runs {' or '.join(MODEL_CLASSES)} models")
        return
    t.set("data.backend", MODEL_CLASSES[value])


def _normalize_activations(t: _Translation, value: Any) -> None:
    if value not in NORMALIZE_MODES:
        t.refuse("normalize_activations", "saekit trains with none or expected_average_only_in")
        return
    t.set("sae.norm_scaling", NORMALIZE_MODES[value])


def _rescale_acts_by_decoder_norm(t: _Translation, value: Any) -> None:
    # Ranking by h * ||W_dec|| is ranking by h once rows have unit norm, which saekit's topk
    # SAEs keep; without rescaling, SAELens leaves the rows free, as decoder_norm "free" does.
    if value is False:
        t.set("training.decoder_norm", "free")


def _decoder_init_norm(t: _Translation, value: Any) -> None:
    from saekit.saes import architecture_class

    architecture = t.sections.get("sae", {}).get("architecture")
    if architecture is None:
        return  # refused already
    try:
        own = architecture_class(architecture).decoder_init_norm
    except ValueError:
        return  # the unknown architecture is reported by the config's own check
    if not _same(value, 0.1) and not _same(value, own):  # 0.1: SAELens's default
        t.refuse("decoder_init_norm", f"saekit starts {architecture} decoder rows at norm {own}")


def _schedule(t: _Translation, _value: Any) -> None:
    """lr_scheduler_name, lr_end and lr_decay_steps together: SAELens's schedule as one of
    saekit's, or a refusal."""
    name = str(t.fields.get("lr_scheduler_name") or "constant").lower()
    decay = t.fields.get("lr_decay_steps") or 0
    lr_end = t.fields.get("lr_end")
    if name not in SCHEDULES:
        t.refuse("lr_scheduler_name", "saekit's schedules are constant, cosine and linear")
    elif name == "constant" and decay:
        # SAELens's constant schedule decays linearly to zero over the last decay steps.
        t.set("training.lr_schedule", "linear")
        t.set("training.lr_decay_fraction", min(decay / t.total_steps(), 1.0))
    elif name == "cosineannealing":
        if decay or lr_end != 0:
            field = "lr_decay_steps" if decay else "lr_end"
            t.refuse(field, "saekit's cosine schedule ends at zero with no decay phase; set "
                     "lr_end: 0 and lr_decay_steps: 0")
        else:
            t.set("training.lr_schedule", "cosine")


def _n_checkpoints(t: _Translation, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        t.refuse("n_checkpoints", "a number of checkpoints")
        return
    if value == 0:
        return  # saekit still writes its resume checkpoints
    tokens = t.total_steps() * t.batch
    t.set("run.checkpoint_every", max(-(-tokens // (int(value) + 1)), 1))
    t.set("run.keep_checkpoints", int(value))


def _eval_dataset_split(t: _Translation, value: Any) -> None:
    if t.fields.get("eval_dataset_path") is not None:
        t.set("data.eval_split", value)


def _dtype(t: _Translation, value: Any) -> None:
    if isinstance(value, str):
        t.set("run.dtype", value.removeprefix("torch."))
    else:
        t.refuse("dtype", "a dtype name such as float32")


def _logger(t: _Translation, value: Any) -> None:
    if not isinstance(value, dict):
        t.refuse("logger", "SAELens's logger is a mapping")
        return
    for key, inner in value.items():
        name = f"logger.{key}"
        t.fields[name], t.names[name] = inner, name
        if key in LOGGER_FIELDS:
            if inner is not None:
                t.set(TRANSLATED[key], inner)
        elif key not in IGNORED:
            t.refuse(name, "not a field of SAELens's LoggingConfig")


#: Fields with a rule of their own.
RULES: dict[str, Callable[[_Translation, Any], None]] = {
    "architecture": _architecture,
    "activation_fn": _activation_fn,
    "activation_fn_kwargs": _activation_fn_kwargs,
    "k": _k,
    "matryoshka_widths": _matryoshka_widths,
    "model_class_name": _model_class_name,
    "normalize_activations": _normalize_activations,
    "rescale_acts_by_decoder_norm": _rescale_acts_by_decoder_norm,
    "decoder_init_norm": _decoder_init_norm,
    "lr_scheduler_name": _schedule,
    "lr_end": lambda t, v: None,  # read by _schedule
    "lr_decay_steps": _schedule,
    "n_checkpoints": _n_checkpoints,
    "eval_dataset_split": _eval_dataset_split,
    "dtype": _dtype,
    "logger": _logger,
}


def _flatten(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Runner and SAE fields in one mapping, and how each was written."""
    fields: dict[str, Any] = {}
    names: dict[str, str] = {}
    sae = data.get("sae")
    if isinstance(sae, dict):
        for key, value in sae.items():
            # SAELens moves the SAE to the runner's device and dtype: the SAE's own are unused.
            if key not in ("device", "dtype"):
                fields[key], names[key] = value, f"sae.{key}"
    for key, value in data.items():
        if key != "sae":
            fields[key], names[key] = value, key
    return fields, names


def from_saelens_config(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """saekit's config sections ({"sae": ..., "data": ..., "training": ..., "run": ...}) for
    a SAELens runner config; raises `SAELensConfigError` naming every field refused."""
    if "sae" in data and not isinstance(data["sae"], dict):
        raise SAELensConfigError([("sae", "sae must be a mapping of the SAE's fields")])
    fields, names = _flatten(data)
    t = _Translation(fields, names)
    # First, as other rules read it; absent, it is SAELens's default.
    _architecture(t, fields.get("architecture", "standard"))
    schedule_done = False
    for field, value in list(fields.items()):
        if field == "architecture":
            continue
        if field in RULES:
            if RULES[field] is _schedule:
                if schedule_done:
                    continue
                schedule_done = True
            RULES[field](t, value)
        elif field in TRANSLATED:
            if value is not None:
                t.set(TRANSLATED[field], value)
        elif field in STEP_COUNTS:
            if value is not None:
                t.set(STEP_COUNTS[field], int(value) * t.batch)
        elif field in FIXED:
            accepted, why = FIXED[field]
            if not any(_same(value, ok) for ok in accepted):
                t.refuse(field, why)
        elif field not in IGNORED:
            t.refuse(field, "not a field of SAELens's runner or SAE configs")
    if t.problems:
        raise SAELensConfigError(t.problems)
    return t.sections


def saelens_train_config(
    runner_config: dict[str, Any], /, **sections: dict[str, Any]
) -> TrainConfig:
    """The `TrainConfig` for a SAELens runner config (a dict, as `cfg.to_dict()` gives it);
    `sections` add or override saekit's own settings, e.g. `data={"eval_tokens": 8192}`."""
    from saekit.training.config import TrainConfig

    merged = from_saelens_config(runner_config)
    for section, values in sections.items():
        merged.setdefault(section, {}).update(values)
    return TrainConfig.from_dict(merged)
