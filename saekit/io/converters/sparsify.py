"""EleutherAI sparsify: per hook point a folder with cfg.json + sae.safetensors.

Sparse coders whose encoder is an nn.Linear (`encoder.weight` [d_sae, d_in], `encoder.bias`),
with `W_dec` [d_sae, d_in] and `b_dec` [d_in]; the input is centred by b_dec before encoding.
cfg.json's `activation` picks the latents: "topk" (the default: the k largest ReLU'd
pre-activations) or "groupmax" (the largest in each of k equal groups, saekit's `groupmax`).
Every cfg.json field is checked: one saekit does not know, or a value it cannot honour, is an
error rather than something to load past.
Folders are named after the Hugging Face module they read (`layers.12` is the output of
layer 12, i.e. `blocks.12.hook_resid_post`).
"""

from __future__ import annotations

import re

from saekit.io.converters.base import (
    ConvertContext,
    Converted,
    check_types,
    current_cfg,
    require,
)
from saekit.io.converters.files import exact_keys
from saekit.io.native import read_json, read_safetensors
from saekit.io.sources import FileSource, join

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"

_HOOKS = (
    (re.compile(r"^(?:.*\.)?layers\.(\d+)$"), "blocks.{}.hook_resid_post"),
    (re.compile(r"^(?:.*\.)?layers\.(\d+)\.mlp$"), "blocks.{}.hook_mlp_out"),
    (re.compile(r"^(?:.*\.)?layers\.(\d+)\.(?:self_attn|attention)$"), "blocks.{}.hook_attn_out"),
)


def hook_from_module(module: str) -> str:
    """TransformerLens hook for a sparsify folder name; unknown names are kept as they are."""
    for pattern, template in _HOOKS:
        match = pattern.match(module)
        if match:
            return template.format(match.group(1))
    return module


def is_sparsify_cfg(cfg: dict) -> bool:
    return "d_sae" not in cfg and ("num_latents" in cfg or "expansion_factor" in cfg)


#: Every field sparsify writes to cfg.json (its SparseCoderConfig, older `signed`, and d_in),
#: with what it must be.
_CFG_KINDS = {
    "activation": "a string",
    "expansion_factor": "an integer",
    "normalize_decoder": "true or false",
    "num_latents": "an integer",
    "k": "an integer",
    "multi_topk": "true or false",
    "skip_connection": "true or false",
    "transcode": "true or false",
    "signed": "true or false",
    "d_in": "an integer",
}
#: sparsify's activation names and the saekit architecture each loads as.
_ACTIVATIONS = {"topk": "topk", "groupmax": "groupmax"}


def _check_cfg(raw: dict, where: str) -> str:
    """The architecture a sparsify cfg.json describes; anything unknown is an error."""
    unknown = sorted(set(raw) - set(_CFG_KINDS))
    if unknown:
        raise ValueError(
            f"{where} has field(s) {unknown} that saekit does not know (sparsify's fields: "
            f"{', '.join(_CFG_KINDS)}); they may change what the SAE computes, so it is not "
            "loaded"
        )
    require(raw, ("k",), where)
    check_types(raw, _CFG_KINDS, where, ("k",))
    activation = raw.get("activation", "topk")
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"{where}: activation {activation!r} is not one saekit knows; known: "
            f"{', '.join(_ACTIVATIONS)}"
        )
    if raw.get("signed"):
        raise ValueError(f"{where}: signed sparse coders are not supported by saekit")
    if raw.get("skip_connection"):
        raise ValueError(
            f"{where} describes a sparse coder with a skip connection; saekit's "
            f"{_ACTIVATIONS[activation]} SAE has none, so it cannot be loaded faithfully"
        )
    return _ACTIVATIONS[activation]


def convert_sparsify(source: FileSource, ctx: ConvertContext) -> Converted:
    cfg_path = join(ctx.folder, CFG_FILE)
    raw = source.read(cfg_path, read_json)
    where = source.describe(cfg_path)
    architecture = _check_cfg(raw, where)
    if raw.get("transcode"):
        raise ValueError(
            f"{where} describes a sparsify transcoder; saekit has no top-k transcoder "
            "architecture yet, so it cannot be loaded"
        )
    weights_path = join(ctx.folder, WEIGHTS_FILE)
    stored = source.read(weights_path, read_safetensors)
    where_weights = source.describe(weights_path)
    if "W_skip" in stored:
        raise ValueError(
            f"{where_weights} has a skip connection (W_skip); saekit's {architecture} SAE "
            "has none, so it cannot be loaded faithfully"
        )
    exact_keys(stored, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), where_weights)
    d_sae, d_in = stored["encoder.weight"].shape
    declared = raw.get("num_latents") or d_in * raw.get("expansion_factor", 32)
    if raw.get("d_in", d_in) != d_in or declared != d_sae:
        raise ValueError(
            f"{where}: d_in={raw.get('d_in')}, num_latents={raw.get('num_latents')}, "
            f"expansion_factor={raw.get('expansion_factor')} do not match the weights "
            f"(encoder.weight [{d_sae}, {d_in}])"
        )
    tensors = {
        "W_enc": stored["encoder.weight"].T.contiguous(),  # [d_in, d_sae]
        "b_enc": stored["encoder.bias"],
        "W_dec": stored["W_dec"],
        "b_dec": stored["b_dec"],
    }
    module = ctx.folder.rstrip("/").rsplit("/", 1)[-1]
    metadata = {
        "model_name": ctx.model,
        "hook_name": hook_from_module(module) if module else None,
        "sparsify_hookpoint": module or None,
    }
    cfg = current_cfg(
        architecture, tensors, metadata, k=int(raw["k"]), apply_b_dec_to_input=True
    )
    return Converted(cfg, tensors)
