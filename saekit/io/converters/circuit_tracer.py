"""Transcoders published for circuit-tracer: per-layer transcoders and cross-layer ones.

mwhanna (`mwhanna/qwen3-*-transcoders*`): one `layer_<n>.safetensors` per layer with W_enc
[d_sae, d_in], b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out] and, in skip transcoders,
W_skip [d_out, d_in]; beside them `wandb-config.yaml` (spelled `wanb-config.yaml` in some
repos: d_model and d_feature under `value`) and `config.yaml` (model_name and the hooks,
absent in some repos). f = ReLU(x @ W_enc.T + b_enc), out = f @ W_dec + b_dec (+ x @ W_skip.T).

mntss cross-layer transcoders (`mntss/clt-*`): per source layer n, `W_enc_<n>.safetensors`
(W_enc_<n> [d_sae, d_in], b_enc_<n>, b_dec_<n> [d_out], threshold_<n> [d_sae] when the
activation is JumpReLU, and W_skip_<n> [d_in, d_out] when the CLT has a skip connection,
added to layer n's output as x_n @ W_skip_<n>) and `W_dec_<n>.safetensors` (W_dec_<n>
[d_sae, n_layers - n, d_out]: one decoder per layer from n on), with `config.yaml` naming the
model and hooks. The CLT's output at layer m sums the writes of every layer n <= m. The
`mntss_clt_layer_transcoder` layout loads one layer as the part that one transcoder
represents exactly: layer n's encoder (the CLT's own latents, exactly) and its decoder into
layer n itself, with b_dec_<n> (and layer n's skip path, if any: it writes to layer n alone).
Its output is therefore what layer n's latents write to layer n, not the CLT's whole
reconstruction there (which also holds earlier layers' writes); the decoders into later
layers are left out and counted in the metadata. (SAELens sums a layer's decoders instead,
which matches no output of the CLT.) The `mntss_clt` layout loads the whole CLT instead, as
saekit's `clt` architecture: W_enc_<n> transposed and stacked into W_enc [n_layers, d_in,
d_sae], b_enc_<n>, b_dec_<n> and threshold_<n> stacked, each W_dec_<n> kept as it is (the
same name and shape in saekit), and W_skip_<n> transposed and stacked into W_skip
[n_layers, d_out, d_in].
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from saekit.config import dtype_name
from saekit.io.converters.base import ConvertContext, Converted, current_cfg
from saekit.io.converters.files import check_shape, exact_keys, layer_from, read_yaml
from saekit.io.headers import safetensors_header
from saekit.io.native import read_safetensors
from saekit.io.sources import FileSource, join
from saekit.progress import bar

log = logging.getLogger(__name__)

#: circuit-tracer's hook names inside a block, in TransformerLens's terms.
_HOOKS = {"mlp.hook_in": "ln2.hook_normalized", "mlp.hook_out": "hook_mlp_out"}


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def _hook(layer: int, name: str) -> str:
    return f"blocks.{layer}.{_HOOKS.get(name, name)}"


def _optional_yaml(source: FileSource, *paths: str) -> tuple[dict[str, Any], str] | None:
    """The first of `paths` that exists, read as YAML, with its description."""
    for path in paths:
        if source.fetch(path, required=False) is not None:
            return source.read(path, read_yaml), source.describe(path)
    return None


def _wandb_value(cfg: dict[str, Any], key: str, where: str) -> int:
    entry = cfg.get(key)
    value = entry.get("value") if isinstance(entry, dict) else None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{where}: {key}.value is {value!r}, but it must be an integer")
    return value


def _hooks_cfg(raw: dict[str, Any], where: str) -> tuple[str, str]:
    hooks = (raw.get("feature_input_hook", "mlp.hook_in"),
             raw.get("feature_output_hook", "mlp.hook_out"))
    if not all(isinstance(h, str) and h for h in hooks):
        raise ValueError(f"{where}: feature_input_hook and feature_output_hook must be strings")
    return hooks


def convert_mwhanna_transcoder(source: FileSource, ctx: ConvertContext) -> Converted:
    where = source.describe(ctx.folder)
    layer = layer_from(ctx.folder.rsplit("/", 1)[-1], r"^layer_(\d+)\.safetensors$", where)
    root = _parent(ctx.folder)
    wandb = _optional_yaml(
        source, join(root, "wandb-config.yaml"), join(root, "wanb-config.yaml")
    )
    if wandb is None:
        raise FileNotFoundError(
            f"{source.describe(root or '.')} has neither wandb-config.yaml nor "
            "wanb-config.yaml, which give the transcoder's sizes"
        )
    wandb_cfg, where_wandb = wandb
    d_model = _wandb_value(wandb_cfg, "d_model", where_wandb)
    d_sae = _wandb_value(wandb_cfg, "d_feature", where_wandb)
    base = _optional_yaml(source, join(root, "config.yaml"))
    base_cfg, where_base = base if base is not None else ({}, "")
    hook_in, hook_out = _hooks_cfg(base_cfg, where_base)

    stored = source.read(ctx.folder, read_safetensors)
    exact_keys(stored, ("W_enc", "b_enc", "W_dec", "b_dec"), where, optional=("W_skip",))
    check_shape(stored["W_enc"], (d_sae, d_model), "W_enc", where)
    check_shape(stored["b_enc"], (d_sae,), "b_enc", where)
    check_shape(stored["W_dec"], (d_sae, d_model), "W_dec", where)
    check_shape(stored["b_dec"], (d_model,), "b_dec", where)
    tensors = {
        "W_enc": stored["W_enc"].T.contiguous(),  # [d_in, d_sae]
        "b_enc": stored["b_enc"],
        "W_dec": stored["W_dec"],
        "b_dec": stored["b_dec"],
    }
    architecture = "transcoder"
    if "W_skip" in stored:
        check_shape(stored["W_skip"], (d_model, d_model), "W_skip", where)
        tensors["W_skip"] = stored["W_skip"]
        architecture = "skip_transcoder"
    model = base_cfg.get("model_name") or ctx.model
    metadata = {
        "model_name": model,
        "hook_name": _hook(layer, hook_in),
        "hook_name_out": _hook(layer, hook_out),
        "dataset_path": "monology/pile-uncopyrighted",
    }
    cfg = current_cfg(architecture, tensors, metadata)
    cfg["d_out"] = d_model
    return Converted(cfg, tensors)


def _same_layer_decoder(name: str, where: str):  # noqa: ANN202 - a reader closure
    """A reader taking decoder `name`'s slice into its own layer, [d_sae, d_out], without
    reading the decoders into later layers (the file holds all of them)."""

    def read(file: Path) -> Tensor:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                if name not in handle.keys():  # noqa: SIM118 - safe_open has no __contains__
                    raise ValueError(f"{where} has no tensor {name} (found {handle.keys()})")
                return handle.get_slice(name)[:, 0, :].contiguous()
        except SafetensorError as err:
            raise ValueError(f"{file} could not be read as safetensors ({err})") from err

    return read


def convert_mntss_clt_layer(source: FileSource, ctx: ConvertContext) -> Converted:
    folder = ctx.folder.strip("/")
    layer_text = folder.rsplit("/", 1)[-1]
    if not re.fullmatch(r"\d+", layer_text):
        raise ValueError(
            f"{source.describe(folder)}: a CLT layer is named by its number (the registry's "
            "path, e.g. '12'), not a folder"
        )
    layer, root = int(layer_text), _parent(folder)
    cfg_path = join(root, "config.yaml")
    raw = source.read(cfg_path, read_yaml)
    hook_in, hook_out = _hooks_cfg(raw, source.describe(cfg_path))

    enc_path = join(root, f"W_enc_{layer}.safetensors")
    where_enc = source.describe(enc_path)
    enc = source.read(enc_path, read_safetensors)
    names = {k: f"{k}_{layer}" for k in ("W_enc", "b_enc", "b_dec", "threshold", "W_skip")}
    exact_keys(
        enc, (names["W_enc"], names["b_enc"], names["b_dec"]), where_enc,
        (names["threshold"], names["W_skip"]),
    )
    d_sae, d_in = enc[names["W_enc"]].shape
    d_out = enc[names["b_dec"]].shape[0]
    check_shape(enc[names["b_enc"]], (d_sae,), names["b_enc"], where_enc)

    dec_path = join(root, f"W_dec_{layer}.safetensors")
    where_dec = source.describe(dec_path)
    header = source.read(dec_path, safetensors_header)
    exact_keys(header, (f"W_dec_{layer}",), where_dec)
    shape = tuple(header[f"W_dec_{layer}"].shape)
    if len(shape) != 3 or shape[0] != d_sae or shape[2] != d_out or shape[1] < 1:
        raise ValueError(
            f"{where_dec}: W_dec_{layer} has shape {list(shape)}, expected [{d_sae}, "
            f"n_later_layers, {d_out}] (one decoder per layer from {layer} on)"
        )
    w_dec = source.read(dec_path, _same_layer_decoder(f"W_dec_{layer}", where_dec))
    tensors = {
        "W_enc": enc[names["W_enc"]].T.contiguous(),  # [d_in, d_sae]
        "b_enc": enc[names["b_enc"]],
        "W_dec": w_dec,  # [d_sae, d_out]: the decoder into layer `layer` itself
        "b_dec": enc[names["b_dec"]],
    }
    architecture = "transcoder"
    if names["threshold"] in enc:
        check_shape(enc[names["threshold"]], (d_sae,), names["threshold"], where_enc)
        tensors["threshold"] = enc[names["threshold"]]
        architecture = "jumprelu_transcoder"
    if names["W_skip"] in enc:
        check_shape(enc[names["W_skip"]], (d_in, d_out), names["W_skip"], where_enc)
        tensors["W_skip"] = enc[names["W_skip"]].T.contiguous()  # [d_out, d_in], x @ W.T
        architecture = architecture.replace("transcoder", "skip_transcoder")
    if shape[1] > 1:
        log.info(
            "%s: loaded layer %d of a cross-layer transcoder with its decoder into layer %d "
            "only; its %d decoders into later layers are left out",
            source.describe(root or "."), layer, layer, shape[1] - 1,
        )
    metadata = {
        "model_name": raw.get("model_name") or ctx.model,
        "hook_name": _hook(layer, hook_in),
        "hook_name_out": _hook(layer, hook_out),
        "clt_layer": layer,
        "clt_decoders_left_out": shape[1] - 1,
    }
    cfg = current_cfg(architecture, tensors, metadata)
    cfg["d_out"] = int(d_out)
    return Converted(cfg, tensors)


def _clt_layer_count(source: FileSource, root: str) -> int:
    """Layers of the CLT in `root`: W_enc_0, W_enc_1, ... up to the first one missing."""
    n = 0
    while source.fetch(join(root, f"W_enc_{n}.safetensors"), required=False) is not None:
        n += 1
    if n == 0:
        raise FileNotFoundError(
            f"{source.describe(root or '.')} holds no W_enc_0.safetensors; a cross-layer "
            "transcoder in circuit-tracer's layout has W_enc_<n>/W_dec_<n>.safetensors per layer"
        )
    return n


def convert_mntss_clt(source: FileSource, ctx: ConvertContext) -> Converted:
    """A whole cross-layer transcoder in circuit-tracer's layout (mntss's CLTs, and what
    `export_circuit_tracer_clt` writes) as saekit's `clt`: every encoder and every decoder."""
    root = ctx.folder.strip("/")
    cfg_path = join(root, "config.yaml")
    raw = source.read(cfg_path, read_yaml)
    hook_in, hook_out = _hooks_cfg(raw, source.describe(cfg_path))
    n_layers = _clt_layer_count(source, root)
    W_enc, b_enc, b_dec, thresholds, skips, tensors = [], [], [], [], [], {}
    shape: tuple[int, int] | None = None
    for layer in bar(range(n_layers), desc="reading the CLT", unit="layer", delay=2.0):
        path = join(root, f"W_enc_{layer}.safetensors")
        where = source.describe(path)
        enc = source.read(path, read_safetensors)
        names = {k: f"{k}_{layer}" for k in ("W_enc", "b_enc", "b_dec", "threshold", "W_skip")}
        exact_keys(enc, (names["W_enc"], names["b_enc"], names["b_dec"]), where,
                   (names["threshold"], names["W_skip"]))
        if shape is None:
            shape = tuple(enc[names["W_enc"]].shape)  # type: ignore[assignment]
            has_threshold = names["threshold"] in enc
            has_skip = names["W_skip"] in enc
        assert shape is not None
        d_sae, d_model = shape
        if (names["W_skip"] in enc) != has_skip:
            raise ValueError(f"{where}: some layers have skip weights (W_skip_<n>) and others "
                             "not; a CLT has a skip connection in every layer or in none")
        if has_skip:
            check_shape(enc[names["W_skip"]], (d_model, d_model), names["W_skip"], where)
            skips.append(enc[names["W_skip"]].T)  # applied as x @ W_skip_<n>
        check_shape(enc[names["W_enc"]], (d_sae, d_model), names["W_enc"], where)
        check_shape(enc[names["b_enc"]], (d_sae,), names["b_enc"], where)
        check_shape(enc[names["b_dec"]], (d_model,), names["b_dec"], where)
        if (names["threshold"] in enc) != has_threshold:
            raise ValueError(f"{where}: some layers have thresholds and others not")
        W_enc.append(enc[names["W_enc"]].T)  # [d_in, d_sae]
        b_enc.append(enc[names["b_enc"]])
        b_dec.append(enc[names["b_dec"]])
        if has_threshold:
            check_shape(enc[names["threshold"]], (d_sae,), names["threshold"], where)
            thresholds.append(enc[names["threshold"]])
        dec_path = join(root, f"W_dec_{layer}.safetensors")
        dec = source.read(dec_path, read_safetensors)
        exact_keys(dec, (f"W_dec_{layer}",), source.describe(dec_path))
        check_shape(dec[f"W_dec_{layer}"], (d_sae, n_layers - layer, d_model),
                    f"W_dec_{layer}", source.describe(dec_path))
        tensors[f"W_dec_{layer}"] = dec[f"W_dec_{layer}"]
    assert shape is not None
    tensors.update({
        "W_enc": torch.stack(W_enc).contiguous(),  # [n_layers, d_in, d_sae]
        "b_enc": torch.stack(b_enc),
        "b_dec": torch.stack(b_dec),
    })
    if thresholds:
        tensors["threshold"] = torch.stack(thresholds)
    if skips:
        tensors["W_skip"] = torch.stack(skips).contiguous()  # [n_layers, d_out, d_in]
    metadata = {
        "model_name": raw.get("model_name") or ctx.model,
        "hook_names": [_hook(layer, hook_in) for layer in range(n_layers)],
        "hook_names_out": [_hook(layer, hook_out) for layer in range(n_layers)],
    }
    cfg = {
        "architecture": "clt",
        "d_in": shape[1],
        "d_sae": shape[0],
        "dtype": dtype_name(tensors["W_enc"].dtype),
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "n_layers": n_layers,
        "activation_fn": "jumprelu" if thresholds else "relu",
        "metadata": {k: v for k, v in metadata.items() if v is not None},
    }
    if skips:
        cfg["skip_connection"] = True
    return Converted(cfg, tensors)
