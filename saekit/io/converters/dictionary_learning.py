"""saprmarks/dictionary_learning checkpoints: `<folder>/ae.pt` + `<folder>/config.json`.

`ae.pt` is a pickled state dict, read with `torch.load(weights_only=True)` so that it cannot
run code. `config.json` names the class under `trainer.dict_class`; each class stores its
weights differently (nn.Linear layers, or W_enc/W_dec matrices) and maps onto one saekit
architecture. BatchTopK-style classes keep one global threshold at inference, so they load as
JumpReLU with that threshold for every latent.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saekit.io.converters.base import (
    ConvertContext,
    Converted,
    check_types,
    current_cfg,
    require,
)
from saekit.io.native import read_json
from saekit.io.sources import FileSource, join

_SITES = {"resid_post": "hook_resid_post", "mlp_out": "hook_mlp_out", "attn_out": "hook_attn_out"}


def read_torch_state(file: Path) -> dict[str, Tensor]:
    """A tensor state dict from a torch pickle, refusing anything but plain tensors/containers."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError) as err:
        raise ValueError(f"{file} could not be read as a torch state dict ({err})") from err
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{file} does not hold a dict of tensors")
    for name, tensor in state.items():
        # A pickle can declare a huge view over a few stored bytes (zero strides); making
        # it contiguous would then allocate far beyond the file.
        if tensor.numel() * tensor.element_size() > tensor.untyped_storage().nbytes():
            raise ValueError(
                f"{file}: tensor {name!r} of shape {list(tensor.shape)} is larger than the "
                "data stored for it; the file is damaged or was made to mislead"
            )
    return state


#: The trainer settings read, and what each must be.
_TRAINER_KINDS = {
    "dict_class": "a string",
    "k": "an integer",
    "apply_b_dec_to_input": "true or false",
    "submodule_name": "a string",
    "layer": "an integer",
    "lm_name": "a string",
}


def _hook(trainer: dict[str, Any]) -> str | None:
    submodule = str(trainer.get("submodule_name", ""))
    layer = trainer.get("layer")
    match = re.match(r"(resid_post|mlp_out|attn_out)_layer_(\d+)", submodule)
    if match:
        return f"blocks.{match.group(2)}.{_SITES[match.group(1)]}"
    return None if layer is None else f"blocks.{layer}.hook_resid_post"


def _linear(state: dict[str, Tensor], bias_names: tuple[str, ...], where: str) -> dict[str, Tensor]:
    require(state, ("encoder.weight", "decoder.weight"), where)
    b_dec = next((state[n] for n in bias_names if n in state), None)
    if b_dec is None:
        raise ValueError(f"{where} has no decoder bias ({' or '.join(bias_names)})")
    tensors = {
        "W_enc": state["encoder.weight"].T.contiguous(),  # [d_in, d_sae]
        "W_dec": state["decoder.weight"].T.contiguous(),  # [d_sae, d_in]
        "b_dec": b_dec,
    }
    if "encoder.bias" in state:
        tensors["b_enc"] = state["encoder.bias"]
    return tensors


def _global_threshold(state: dict[str, Tensor], d_sae: int, where: str) -> Tensor:
    require(state, ("threshold",), where)
    threshold = state["threshold"].float()
    if threshold.numel() == 1:
        return threshold.reshape(()).expand(d_sae).clone()
    return threshold


def convert_dictionary_learning(source: FileSource, ctx: ConvertContext) -> Converted:
    cfg_path = join(ctx.folder, "config.json")
    raw = source.read(cfg_path, read_json)
    where_cfg = source.describe(cfg_path)
    require(raw, ("trainer",), where_cfg)
    check_types(raw, {"trainer": "an object", "buffer": "an object"}, where_cfg)
    trainer = raw["trainer"] or {}
    require(trainer, ("dict_class",), where_cfg + " trainer")
    check_types(trainer, _TRAINER_KINDS, where_cfg + " trainer", ("dict_class",))
    check_types(raw.get("buffer") or {}, {"ctx_len": "an integer"}, where_cfg + " buffer")
    state_path = join(ctx.folder, "ae.pt")
    where = source.describe(state_path)
    state = source.read(state_path, read_torch_state)
    dict_class = trainer["dict_class"]
    fields: dict[str, Any] = {"apply_b_dec_to_input": True}
    if dict_class in ("AutoEncoder", "AutoEncoderNew"):
        architecture, tensors = "standard", _linear(state, ("bias", "b_dec"), where)
    elif dict_class == "AutoEncoderTopK":
        architecture, tensors = "topk", _linear(state, ("b_dec",), where)
        k = trainer.get("k", state["k"].item() if "k" in state else None)
        if k is None:
            raise ValueError(f"{where}: a top-k SAE without k (neither config nor ae.pt has it)")
        fields["k"] = int(k)
    elif dict_class == "GatedAutoEncoder":
        architecture, tensors = "gated", _linear(state, ("decoder_bias",), where)
        require(state, ("gate_bias", "mag_bias", "r_mag"), where)
        tensors.update(b_gate=state["gate_bias"], b_mag=state["mag_bias"], r_mag=state["r_mag"])
    elif dict_class == "BatchTopKSAE":
        architecture, tensors = "jumprelu", _linear(state, ("b_dec",), where)
        tensors["threshold"] = _global_threshold(state, tensors["W_enc"].shape[1], where)
    elif dict_class in ("MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder"):
        require(state, ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"), where)
        architecture = "jumprelu"
        tensors = {k: state[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
        tensors["threshold"] = _global_threshold(state, tensors["W_enc"].shape[1], where)
        if dict_class == "JumpReluAutoEncoder":
            fields["apply_b_dec_to_input"] = bool(trainer.get("apply_b_dec_to_input", False))
    else:
        raise ValueError(
            f"{source.describe(cfg_path)}: dictionary_learning class {dict_class!r} is not "
            "supported; supported: AutoEncoder, AutoEncoderTopK, GatedAutoEncoder, BatchTopKSAE, "
            "MatryoshkaBatchTopKSAE, JumpReluAutoEncoder"
        )
    buffer = raw.get("buffer") or {}
    metadata = {
        "model_name": ctx.model or trainer.get("lm_name"),
        "hook_name": _hook(trainer),
        "context_size": buffer.get("ctx_len"),
        "prepend_bos": True,
        "dictionary_learning_class": dict_class,
    }
    return Converted(current_cfg(architecture, tensors, metadata, **fields), tensors)
