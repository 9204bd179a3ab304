"""EleutherAI sparsify: per hook point a folder with cfg.json + sae.safetensors.

Top-k SAEs whose encoder is an nn.Linear (`encoder.weight` [d_sae, d_in], `encoder.bias`),
with `W_dec` [d_sae, d_in] and `b_dec` [d_in]; the input is centred by b_dec before encoding.
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


def convert_sparsify(source: FileSource, ctx: ConvertContext) -> Converted:
    cfg_path = join(ctx.folder, CFG_FILE)
    raw = source.read(cfg_path, read_json)
    where = source.describe(cfg_path)
    require(raw, ("k",), where)
    check_types(raw, {"k": "an integer", "transcode": "true or false"}, where, ("k",))
    if raw.get("transcode"):
        raise ValueError(
            f"{where} describes a sparsify transcoder; saekit has no top-k transcoder "
            "architecture yet, so it cannot be loaded"
        )
    weights_path = join(ctx.folder, WEIGHTS_FILE)
    stored = source.read(weights_path, read_safetensors)
    require(
        stored, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), source.describe(weights_path)
    )
    if "W_skip" in stored:
        raise ValueError(
            f"{source.describe(weights_path)} has a skip connection (W_skip); saekit's top-k SAE "
            "has none, so it cannot be loaded faithfully"
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
    cfg = current_cfg("topk", tensors, metadata, k=int(raw["k"]), apply_b_dec_to_input=True)
    return Converted(cfg, tensors)
