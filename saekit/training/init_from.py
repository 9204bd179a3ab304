"""Fine-tuning: a run that starts from a saved or published SAE instead of fresh weights.

The source decides what the SAE is: its architecture, widths, k and hook(s) become the run's
settings (`resolve_config`), and settings the user gave that contradict them are refused
before any model loads. `training_start` turns the source into the SAE the trainer steps:
the same function, expressed on the run's norm-scaled activations, so the trainer's usual
fold at the end gives back an SAE that takes raw activations.

What carries over is the SAE's weights, its thresholds and its config fields; the optimiser
state, the learning-rate schedule, the sparsity coefficient (or target-L0 controller) and the
dead-latent counters start afresh from the run's config, as in any new run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saekit.config import SAEConfig, SAEMetadata
from saekit.errors import SaekitError, one_line
from saekit.saes import SAE
from saekit.training.config import SECTIONS, SETTING_ALIASES, TrainConfig
from saekit.training.fields import ConfigError
from saekit.training.init import UnitNormDecoder

#: The key of the fine-tuning record in run_state.json and in the saved SAE's metadata.
INIT_KEY = "init_from"
#: Input normalisations an SAE applies to each token itself; training takes activations the
#: data pipeline has already scaled, so such an SAE is not trained (SAE.training_forward).
PER_TOKEN_NORMALIZATION = ("constant_norm_rescale", "layer_norm")
#: The SAE config fields a fine-tuning run keeps from its source (besides the sizes).
KEPT_FIELDS = (
    "architecture", "d_in", "d_sae", "d_out", "apply_b_dec_to_input", "k",
    "rescale_acts_by_decoder_norm", "matryoshka_widths", "reshape_activations",
)


@dataclass(frozen=True)
class InitSource:
    """A saved or published SAE that a run starts from."""

    spec: str
    """The source as the user named it (`--init-from`)."""
    identity: str
    """Where it was read: a folder's absolute path, else the release/id or Hub repo given."""
    sae: SAE
    """The SAE as loaded (the form that takes raw activations), on the CPU."""
    weights_sha256: str
    """`weights_sha256(sae)` of the weights as loaded: what the run started from."""

    def record(self) -> dict[str, Any]:
        """What the run folder and the trained SAE's metadata remember of the source."""
        return {
            "source": self.spec,
            "identity": self.identity,
            "architecture": self.sae.cfg.architecture,
            "weights_sha256": self.weights_sha256,
        }


def weights_sha256(sae: SAE) -> str:
    """SHA-256 over an SAE's tensors: for each tensor in name order, its name, dtype and
    shape (as text, each followed by a NUL byte) and then its values' bytes, row-major and
    little-endian. Two SAEs hash alike exactly when every tensor is equal, bit for bit."""
    digest = hashlib.sha256()
    for name, tensor in sorted(sae.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        header = f"{name}\0{str(tensor.dtype).removeprefix('torch.')}\0{list(tensor.shape)}\0"
        digest.update(header.encode())
        # bfloat16 has no numpy dtype: its bytes are read as 16-bit integers.
        array = (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy()
        digest.update(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    return digest.hexdigest()


def load_init_source(spec: str) -> InitSource:
    """Load the SAE `spec` names (a folder, RELEASE/SAE_ID or a Hub repo) on the CPU; a
    problem is reported as a `ValueError` or `OSError` that names `--init-from`."""
    from saekit.targets import load_target

    try:
        sae = load_target(spec, "cpu")
    except (ValueError, OSError, SaekitError) as err:
        message = f"--init-from {spec}: {one_line(err)}"
        # Python's own error types keep their type (FileNotFoundError stays one).
        if type(err).__module__ == "builtins":
            raise type(err)(message) from err
        raise SaekitError(message) from err
    path = Path(spec).expanduser()
    identity = str(path.resolve()) if path.is_dir() else spec
    return InitSource(spec, identity, sae, weights_sha256(sae))


def resolve_config(
    cfg: TrainConfig, source: InitSource, given: Iterable[str] | None = None
) -> TrainConfig:
    """`cfg` with what the source fixes (architecture, d_sae, k, nested widths, b_dec on the
    input, hook names) set to the source's values.

    `given` names the settings the user set ("sae.architecture"; None: those that differ
    from their defaults). A given setting that contradicts the source, or a source this run
    cannot train, is a ConfigError listing every problem. Where the run keeps unit-norm
    decoder rows, the source's row norms are folded into its encoder here (in place, its
    function unchanged)."""
    src = source.sae.cfg
    named = _canonical(given) if given is not None else _changed_from_defaults(cfg)
    fixed: dict[str, Any] = {
        "sae.architecture": src.architecture,
        "sae.d_sae": src.d_sae,
        "sae.k": src.k,
        "sae.matryoshka_widths": src.matryoshka_widths,
        "sae.apply_b_dec_to_input": src.apply_b_dec_to_input,
    }
    meta = src.metadata
    if meta.hook_name is not None:
        fixed["data.hook_name"] = meta.hook_name
    if meta.hook_name_out is not None and source.sae.is_transcoder:
        fixed["data.hook_name_out"] = meta.hook_name_out
    problems: list[str] = []
    data = cfg.to_dict(include_actions=True)
    for setting, value in fixed.items():
        section, name = setting.split(".")
        mine = getattr(getattr(cfg, section), name)
        if setting in named and not _same(mine, value, name):
            problems.append(f"{_flag(name)} {_show(mine)}, but the SAE has {name} {_show(value)}")
        data[section][name] = value
    expansion = cfg.sae.expansion_factor
    if "sae.expansion_factor" in named and "sae.d_sae" not in named:
        if expansion * src.d_in != src.d_sae:
            problems.append(
                f"--expansion-factor {expansion}, but the SAE has {src.d_sae} latents on "
                f"d_in {src.d_in} (expansion factor {src.d_sae / src.d_in:g})"
            )
    target = cfg.training.target_l0
    if source.sae.sparsity_control == "k" and target is not None and target != src.k:
        problems.append(f"--target-l0 {target:g}, but the SAE keeps k={src.k} latents per token")
    problems.extend(_untrainable(cfg, source))
    problems.extend(_fold_rows_to_unit(cfg, source))
    if problems:
        # What to do follows the last problem, so that a single one prints as one line.
        problems[-1] += (
            ". Fine-tuning keeps the architecture, width, k and hook(s) of the SAE it starts "
            "from: leave such settings out, or train a fresh SAE without --init-from"
        )
        raise ConfigError([f"--init-from {source.spec}: {p}" for p in problems])
    return TrainConfig.from_dict(data)


def _untrainable(cfg: TrainConfig, source: InitSource) -> list[str]:
    """Why this run cannot train the source, if it cannot (one sentence each)."""
    src, out = source.sae.cfg, []
    if src.normalize_activations in PER_TOKEN_NORMALIZATION:
        out.append(
            f"the SAE normalises each input itself (normalize_activations="
            f"{src.normalize_activations}), which saekit cannot train; fine-tune an SAE that "
            "takes raw activations"
        )
    if src.normalize_activations == "expected_average_only_in" and not cfg.sae.norm_scaling:
        out.append(
            "the SAE expects activations scaled to an average norm of sqrt(d_in) and records "
            "no factor, so the run must estimate one: drop --no-norm-scaling"
        )
    if src.metadata.hook_head_index is not None:
        out.append(
            f"the SAE reads one attention head (hook_head_index={src.metadata.hook_head_index})"
            "; saekit trains on whole hooks"
        )
    return out


def _fold_rows_to_unit(cfg: TrainConfig, source: InitSource) -> list[str]:
    """Where the run keeps decoder rows at unit norm, fold the source's row norms into its
    encoder (in place; its function unchanged), or say why that cannot be done.

    The trainer puts rows back to unit norm after every step, so rows that are not would be
    cut to it after the first step, changing what the SAE computes."""
    if not UnitNormDecoder.applies(cfg.training.decoder_norm, source.sae):
        return []
    try:
        source.sae.fold_W_dec_norm()
    except ValueError as err:
        return [
            f"the run keeps decoder rows at unit norm (decoder_norm "
            f"{cfg.training.decoder_norm}), but the SAE's rows cannot be brought there "
            f"without changing what it computes ({err}); pass --decoder-norm free"
        ]
    return []


def training_start(
    source: InitSource,
    metadata: SAEMetadata,
    dtype: str,
    device: str,
    norm_scale: float | None,
    decoder_norm: str,
) -> SAE:
    """The SAE the trainer starts from: the source's weights in `dtype` on `device`, with the
    run's `metadata`, expressed on activations multiplied by `norm_scale` (the trainer folds
    the factor back in at the end). Its function on those activations is the source's on
    raw ones: no weight is re-initialised and thresholds are kept as they are."""
    src = source.sae
    cfg = SAEConfig.from_dict({
        **{name: getattr(src.cfg, name) for name in KEPT_FIELDS},
        "dtype": dtype, "device": device, "metadata": metadata.to_dict(),
    })
    sae = SAE.from_tensors(cfg, dict(src.state_dict()), source.identity)
    if norm_scale is not None and src.cfg.normalize_activations == "none":
        # s * f(x) = g(s * x) with W_enc / s, W_dec * s, b_dec * s: the fold by 1 / s.
        # (An expected_average_only_in SAE already takes scaled activations.)
        sae.fold_activation_norm_scaling_factor(1.0 / norm_scale)
    if UnitNormDecoder.applies(decoder_norm, sae):
        sae.fold_W_dec_norm()  # rows of norm s back at unit norm, the function kept
    return sae


def resumed_sae(saved_config: dict[str, Any], metadata: SAEMetadata, dtype: str,
                device: str) -> SAE:
    """An SAE shaped as a fine-tuning run's (from `sae_config` in its run state), for a
    checkpoint to fill: a resumed run does not read its source again."""
    cfg = SAEConfig.from_dict(
        {**saved_config, "dtype": dtype, "device": device, "metadata": metadata.to_dict()}
    )
    return SAE.from_config(cfg)


def state_record(source: InitSource, sae: SAE) -> dict[str, Any]:
    """The fine-tuning record of run_state.json: the source, and the config of the SAE the
    run trains (so that a resumed run can rebuild it without the source)."""
    kept = {name: getattr(sae.cfg, name) for name in KEPT_FIELDS}
    return {**source.record(), "sae_config": {k: v for k, v in kept.items() if v is not None}}


def _canonical(given: Iterable[str]) -> set[str]:
    """Settings named by their canonical names (a config file's `hook` is data.hook_name)."""
    renames = {
        f"{setting.split('.')[0]}.{alias}": setting
        for setting, aliases in SETTING_ALIASES.items()
        for alias in aliases
    }
    return {renames.get(name, name) for name in given}


def _changed_from_defaults(cfg: TrainConfig) -> set[str]:
    defaults = TrainConfig()
    return {
        f"{section}.{name}"
        for section in SECTIONS
        for name in vars(getattr(cfg, section))
        if getattr(getattr(cfg, section), name) != getattr(getattr(defaults, section), name)
    }


def _same(mine: Any, theirs: Any, name: str) -> bool:
    if name == "architecture":
        from saekit.saes.registry import canonical_architecture

        return canonical_architecture(mine) == canonical_architecture(theirs)
    if isinstance(mine, (list, tuple)) and isinstance(theirs, (list, tuple)):
        return list(mine) == list(theirs)
    return mine == theirs


def _flag(name: str) -> str:
    short = {"hook_name": "--hook", "hook_name_out": "--hook-out"}
    return short.get(name, "--" + name.replace("_", "-"))


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return "none" if value is None else str(value)
