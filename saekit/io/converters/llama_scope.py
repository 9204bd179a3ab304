"""OpenMOSS Llama Scope releases (JumpReLU SAEs on Llama 3.1 8B).

Llama Scope: `<folder>/hyperparams.json` + `<folder>/checkpoints/final.safetensors`, weights as
nn.Linear layers (`encoder.weight` [d_sae, d_in], `decoder.weight` [d_in, d_sae], biases) and
one scalar `jump_relu_threshold` for every latent. Inputs are scaled to a dataset-wide norm;
the registry's `norm_scaling_factor` folds that scale into the weights at load.
Llama Scope R1 Distill: `<folder>/config.json` + `<folder>/sae_weights.safetensors` with a
per-latent `log_jumprelu_threshold`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saekit.io.converters.base import (
    ConvertContext,
    Converted,
    check_types,
    current_cfg,
    require,
)
from saekit.io.native import read_json, read_safetensors
from saekit.io.sources import FileSource, join

#: The hyperparameters read, and what each must be.
_HYPERPARAM_KINDS = {
    "jump_relu_threshold": "a number",
    "hook_point_in": "a string",
    "hook_point_out": "a string",
    "norm_activation": "a string",
}


def _linear_tensors(stored: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    require(stored, ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"), where)
    return {
        "W_enc": stored["encoder.weight"].T.contiguous(),  # [d_in, d_sae]
        "b_enc": stored["encoder.bias"],
        "W_dec": stored["decoder.weight"].T.contiguous(),  # [d_sae, d_out]
        "b_dec": stored["decoder.bias"],
    }


def _hooks(raw: dict, architecture: str) -> tuple[str, dict]:
    """A Llama Scope model whose output hook differs from its input hook is a transcoder."""
    hook_in, hook_out = raw.get("hook_point_in"), raw.get("hook_point_out")
    if hook_out and hook_in and hook_out != hook_in:
        return f"{architecture}_transcoder", {"hook_name": hook_in, "hook_name_out": hook_out}
    return architecture, {"hook_name": hook_in}


def convert_llama_scope(source: FileSource, ctx: ConvertContext) -> Converted:
    cfg_path = join(ctx.folder, "hyperparams.json")
    raw = source.read(cfg_path, read_json)
    require(raw, ("jump_relu_threshold", "hook_point_in"), source.describe(cfg_path))
    check_types(
        raw, _HYPERPARAM_KINDS, source.describe(cfg_path), ("jump_relu_threshold",)
    )
    weights_path = join(ctx.folder, "checkpoints/final.safetensors")
    tensors = _linear_tensors(
        source.read(weights_path, read_safetensors), source.describe(weights_path)
    )
    d_sae = tensors["b_enc"].shape[0]
    tensors["threshold"] = torch.full(
        (d_sae,), float(raw["jump_relu_threshold"]), dtype=tensors["b_enc"].dtype
    )
    architecture, hooks = _hooks(raw, "jumprelu")
    metadata = {
        "model_name": ctx.model or "meta-llama/Llama-3.1-8B",
        **hooks,
        "prepend_bos": True,
        "context_size": 1024,
        "dataset_path": "cerebras/SlimPajama-627B",
    }
    normalize = (
        "expected_average_only_in" if raw.get("norm_activation") == "dataset-wise" else "none"
    )
    cfg = current_cfg(architecture, tensors, metadata, normalize_activations=normalize)
    return Converted(cfg, tensors)


def convert_llama_scope_r1_distill(source: FileSource, ctx: ConvertContext) -> Converted:
    cfg_path = join(ctx.folder, "config.json")
    raw = source.read(cfg_path, read_json)
    require(raw, ("hook_point_in",), source.describe(cfg_path))
    check_types(raw, _HYPERPARAM_KINDS, source.describe(cfg_path))
    weights_path = join(ctx.folder, "sae_weights.safetensors")
    where = source.describe(weights_path)
    stored = source.read(weights_path, read_safetensors)
    require(stored, ("log_jumprelu_threshold",), where)
    tensors = _linear_tensors(stored, where)
    tensors["threshold"] = stored["log_jumprelu_threshold"].exp()
    architecture, hooks = _hooks(raw, "jumprelu")
    metadata = {"model_name": ctx.model, **hooks, "prepend_bos": True}
    cfg = current_cfg(
        architecture, tensors, metadata, normalize_activations="expected_average_only_in"
    )
    return Converted(cfg, tensors)
