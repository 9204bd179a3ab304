"""Google DeepMind's Gemma Scope releases (JumpReLU SAEs and transcoders).

Gemma Scope 1 (Gemma 2): `params.npz` in folders such as `layer_12/width_16k/average_l0_82`
(or `embedding/width_4k/...`), the site (res, mlp, att, transcoders) named by the repo id.
Gemma Scope 2 (Gemma 3): `params.safetensors` in folders such as
`resid_post/layer_17_width_16k_l0_big`, the site named by the first folder. Both store
W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc, b_dec and a per-latent threshold (some files
spell the matrices `w_enc`/`w_dec`), and neither subtracts b_dec from the input. Gemma Scope
2's `*_affine` transcoders also hold `affine_skip_connection` [d_in, d_out], added to the output
as x @ affine_skip_connection: they load as `jumprelu_skip_transcoder`. Its cross-layer
transcoders (`clt/...`, one file per layer) load whole as a `clt`, the `_affine` ones with
their skip connection.
"""

from __future__ import annotations

import logging
import math
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from saekit.config import dtype_name
from saekit.io.converters.base import (
    ConvertContext,
    Converted,
    check_types,
    current_cfg,
    pick,
)
from saekit.io.converters.files import exact_keys
from saekit.io.headers import TensorHeader, npz_headers, safetensors_header
from saekit.io.native import read_json, read_safetensors
from saekit.io.sources import FileSource, join
from saekit.progress import bar

log = logging.getLogger(__name__)

NPZ_FILE = "params.npz"
SAFETENSORS_FILE = "params.safetensors"
#: How Gemma Scope 1 was trained (its technical report); Gemma Scope 2 differs, so it gets less.
_GS1_METADATA = {
    "context_size": 1024,
    "prepend_bos": True,
    "dataset_path": "monology/pile-uncopyrighted",
}
_GS2_METADATA = {"prepend_bos": True}


def read_npz(file: Path) -> dict[str, Tensor]:
    """Arrays of an .npz file as tensors; pickled objects are refused."""
    try:
        with np.load(file, allow_pickle=False) as data:
            return {key: torch.from_numpy(np.array(data[key])) for key in data.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        raise ValueError(f"{file} could not be read as .npz ({err}); is it corrupt?") from err


def _checked_params(
    source: FileSource, path: str, headers: Callable[[Path], dict[str, TensorHeader]],
    reader: Callable[[Path], dict[str, Tensor]], keep: tuple[str, ...] = (),
) -> tuple[dict[str, Tensor], str]:
    """The tensors of a params file, read only after its header has shown they make one
    SAE: W_enc [d_in, d_sae], b_enc and threshold [d_sae], W_dec [d_sae, d_out], b_dec
    [d_out], all floats. An .npz inflates when read, so this is checked first."""
    where = source.describe(path)
    declared = source.read(path, headers)
    shapes = _native_tensors({k: h.shape for k, h in declared.items()}, where)
    w_enc, w_dec = shapes["W_enc"], shapes["W_dec"]
    if len(w_enc) != 2 or len(w_dec) != 2:
        raise ValueError(
            f"{where}: W_enc {list(w_enc)} and W_dec {list(w_dec)} must both be matrices"
        )
    d_sae, d_out = w_enc[1], w_dec[1]
    expected = {"W_dec": (d_sae, d_out), "b_enc": (d_sae,), "b_dec": (d_out,),
                "threshold": (d_sae,)}
    for name, shape in expected.items():
        if shapes[name] != shape:
            raise ValueError(
                f"{where}: {name} has shape {list(shapes[name])}, but W_enc {list(w_enc)} and "
                f"W_dec {list(w_dec)} make it {list(shape)}; the file is not one SAE"
            )
    kinds = _native_tensors({k: h.is_float for k, h in declared.items()}, where)
    not_float = sorted(k for k, is_float in kinds.items() if not is_float)
    if not_float:
        raise ValueError(f"{where}: {not_float} are not floating-point arrays")
    stored = source.read(path, reader)
    return {**_native_tensors(stored, where), **{k: stored[k] for k in keep}}, where


def _native_tensors(stored: dict[str, Any], where: str) -> dict[str, Any]:
    return {
        "W_enc": pick(stored, where, "W_enc", "w_enc"),
        "b_enc": pick(stored, where, "b_enc"),
        "W_dec": pick(stored, where, "W_dec", "w_dec"),
        "b_dec": pick(stored, where, "b_dec"),
        "threshold": pick(stored, where, "threshold"),
    }


def _layer(folder: str) -> int | None:
    match = re.search(r"layer_(\d+)", folder)
    return int(match.group(1)) if match else None


def _site_hook(site: str, layer: int | None, where: str) -> tuple[str, dict[str, Any]]:
    """(hook name, extra cfg fields) for a site name: res(id_post), mlp(_out), att(n_out)."""
    if layer is None:
        raise ValueError(f"{where}: no layer_N in the folder name, so the hook is unknown")
    if site.startswith("res"):
        return f"blocks.{layer}.hook_resid_post", {}
    if site.startswith("mlp"):
        return f"blocks.{layer}.hook_mlp_out", {}
    if site.startswith("att"):
        # Attention SAEs read the concatenated head outputs before the output projection.
        return f"blocks.{layer}.attn.hook_z", {"reshape_activations": "hook_z"}
    raise ValueError(f"{where}: unknown Gemma Scope site {site!r} (expected res, mlp or att)")


def _gemma2_model(repo_id: str | None) -> str | None:
    match = re.search(r"gemma-scope-(\d+b)-(pt|it)", repo_id or "")
    if not match:
        return None
    size, kind = match.groups()
    return f"gemma-2-{size}" + ("-it" if kind == "it" else "")


def convert_gemma_scope(source: FileSource, ctx: ConvertContext) -> Converted:
    """Gemma Scope 1 SAEs (params.npz)."""
    path = join(ctx.folder, NPZ_FILE)
    tensors, where = _checked_params(source, path, npz_headers, read_npz)
    repo = ctx.repo_id or ""
    site = next((s for s in ("res", "mlp", "att") if f"-{s}" in repo), "res")
    if ctx.folder.startswith("embedding"):
        hook, extra = "hook_embed", {}
        # The embedding SAEs were trained on rows of the embedding table, while hook_embed sees
        # them multiplied by sqrt(d_model) (Gemma's input scaling); fold that factor in.
        scale = math.sqrt(tensors["W_enc"].shape[0])
        tensors["W_enc"] = tensors["W_enc"] / scale
        tensors["W_dec"] = tensors["W_dec"] * scale
    else:
        hook, extra = _site_hook(site, _layer(ctx.folder), where)
    model = ctx.model or _gemma2_model(repo)
    metadata = {**_GS1_METADATA, "model_name": model, "hook_name": hook}
    return Converted(current_cfg("jumprelu", tensors, metadata, **extra), tensors)


def convert_gemma_scope_transcoder(source: FileSource, ctx: ConvertContext) -> Converted:
    """Gemma Scope 1 transcoders (params.npz): read the MLP input, write the MLP output."""
    path = join(ctx.folder, NPZ_FILE)
    tensors = _checked_params(source, path, npz_headers, read_npz)[0]
    model = ctx.model or _gemma2_model(ctx.repo_id)
    cfg = _transcoder_cfg(tensors, ctx, {**_GS1_METADATA, "model_name": model})
    return Converted(cfg, tensors)


def _transcoder_cfg(
    tensors: dict[str, Tensor], ctx: ConvertContext, base: dict[str, Any]
) -> dict[str, Any]:
    layer = _layer(ctx.folder)
    if layer is None:
        raise ValueError(f"{ctx.folder}: no layer_N in the folder name, so the hooks are unknown")
    metadata = {
        **base,
        "hook_name": f"blocks.{layer}.ln2.hook_normalized",
        "hook_name_out": f"blocks.{layer}.hook_mlp_out",
    }
    cfg = current_cfg("jumprelu_transcoder", tensors, metadata)
    cfg["d_out"] = int(tensors["W_dec"].shape[1])
    return cfg


def _gemma3_model(repo_id: str | None) -> str | None:
    match = re.search(r"gemma-scope-2-([\w.]+?)-(pt|it)$", repo_id or "")
    return f"google/gemma-3-{match.group(1)}-{match.group(2)}" if match else None


AFFINE = "affine_skip_connection"


def _check_gemma_scope_2_config(source: FileSource, folder: str, has_affine: bool) -> bool:
    """Whether the SAE has an affine skip connection, checked against the folder's
    config.json where there is one (its architecture must be "jump_relu")."""
    path = join(folder, "config.json")
    if source.fetch(path, required=False) is None:
        return has_affine
    raw = source.read(path, read_json)
    where = source.describe(path)
    check_types(raw, {"architecture": "a string", "affine_connection": "true or false"}, where)
    if raw.get("architecture", "jump_relu") != "jump_relu":
        raise ValueError(
            f"{where}: architecture {raw['architecture']!r} is not one saekit knows for Gemma "
            "Scope 2 (expected 'jump_relu')"
        )
    declared = raw.get("affine_connection")
    if declared is not None and declared != has_affine:
        raise ValueError(
            f"{where}: affine_connection is {declared} but the weights "
            f"{'hold' if has_affine else 'lack'} {AFFINE}; the folder is inconsistent"
        )
    return has_affine


def convert_gemma_scope_2(source: FileSource, ctx: ConvertContext) -> Converted:
    """Gemma Scope 2 SAEs and transcoders (params.safetensors)."""
    path = join(ctx.folder, SAFETENSORS_FILE)
    where = source.describe(path)
    declared = source.read(path, safetensors_header)
    affine = _check_gemma_scope_2_config(source, ctx.folder, AFFINE in declared)
    if ctx.folder.rstrip("/").endswith("_affine") != affine:
        raise ValueError(
            f"{where}: the folder name says {'an' if not affine else 'no'} affine skip "
            f"connection but the file holds {'one' if affine else 'none'} ({AFFINE}); the "
            "folder and its weights do not match"
        )
    keep = (AFFINE,) if affine else ()
    tensors = _checked_params(source, path, safetensors_header, read_safetensors, keep)[0]
    site = ctx.folder.strip("/").split("/")[0]
    base = {**_GS2_METADATA, "model_name": ctx.model or _gemma3_model(ctx.repo_id)}
    if affine and not site.startswith("transcoder"):
        raise ValueError(f"{where}: only transcoders have an affine skip connection")
    if affine:
        # Stored [d_in, d_out] and added as x @ A; saekit's W_skip is [d_out, d_in] (x @ W.T).
        skip = tensors.pop(AFFINE)
        d_in, d_out = tensors["W_enc"].shape[0], tensors["W_dec"].shape[1]
        if tuple(skip.shape) != (d_in, d_out):
            raise ValueError(
                f"{where}: {AFFINE} has shape {list(skip.shape)}, expected [{d_in}, {d_out}]"
            )
        tensors["W_skip"] = skip.T.contiguous()
        cfg = _transcoder_cfg(tensors, ctx, base)
        cfg["architecture"] = "jumprelu_skip_transcoder"
        return Converted(cfg, tensors)
    if site.startswith(("transcoder", "clt")):
        return Converted(_transcoder_cfg(tensors, ctx, base), tensors)
    site = {"resid_post": "res", "mlp_out": "mlp", "attn_out": "att"}.get(
        site.removesuffix("_all"), site
    )
    hook, extra = _site_hook(site, _layer(ctx.folder), where)
    metadata = {**base, "hook_name": hook}
    return Converted(current_cfg("jumprelu", tensors, metadata, **extra), tensors)


CLT_FILE = "params_layer_{layer}.safetensors"
_CLT_KEYS = ("w_enc", "b_enc", "b_dec", "threshold", "w_dec")


def _clt_layer_reader(layer: int, n_layers: int, where: str):  # noqa: ANN202 - a reader
    """A reader of one `params_layer_<n>.safetensors`: every tensor but w_dec whole, and of
    w_dec [d_sae, n_layers, d_out] only the slots of layers `layer`.. (the earlier slots are
    read one at a time to check that they are zero, never all at once)."""

    def read(file: Path) -> dict[str, Tensor]:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                out = {k: handle.get_tensor(k) for k in handle.keys() if k != "w_dec"}  # noqa: SIM118
                w_dec = handle.get_slice("w_dec")
                earlier = [float(w_dec[:, slot].abs().max()) for slot in range(layer)]
                out["w_dec"] = w_dec[:, layer:].contiguous()
        except SafetensorError as err:
            raise ValueError(f"{file} could not be read as safetensors ({err})") from err
        if any(value > 0 for value in earlier):
            log.warning("%s: decoders into layers before %d are not zero; a CLT writes only "
                        "to its own and later layers, so they are dropped", where, layer)
        return out

    return read


def _clt_layer_tensors(
    source: FileSource, folder: str, layer: int, n_layers: int, affine: bool
) -> dict[str, Tensor]:
    """One layer's tensors, checked from the file's header before anything is read:
    w_enc [d_in, d_sae], b_enc and threshold [d_sae], b_dec [d_out], w_dec [d_sae, n_layers,
    d_out] and, in every layer of an affine CLT, affine_skip_connection [d_in, d_out]."""
    path = join(folder, CLT_FILE.format(layer=layer))
    where = source.describe(path)
    header = {k: h.shape for k, h in source.read(path, safetensors_header).items()}
    if (AFFINE in header) != affine:
        raise ValueError(
            f"{where} {'lacks' if affine else 'holds'} {AFFINE}, unlike layer 0; every layer "
            "of a CLT has a skip connection or none does"
        )
    exact_keys(header, _CLT_KEYS + ((AFFINE,) if affine else ()), where)
    if len(header["w_enc"]) != 2 or len(header["w_dec"]) != 3:
        raise ValueError(
            f"{where}: w_enc {list(header['w_enc'])} and w_dec {list(header['w_dec'])} must be "
            "[d_in, d_sae] and [d_sae, n_layers, d_out]"
        )
    d_in, d_sae = header["w_enc"]
    d_out = header["w_dec"][2]
    expected = {"b_enc": (d_sae,), "threshold": (d_sae,), "b_dec": (d_out,),
                "w_dec": (d_sae, n_layers, d_out), AFFINE: (d_in, d_out)}
    for name, shape in expected.items():
        if name in header and tuple(header[name]) != shape:
            raise ValueError(
                f"{where}: {name} has shape {list(header[name])}, expected {list(shape)} (w_enc "
                f"is {list(header['w_enc'])}; the folder holds {n_layers} layers, each with a "
                "decoder slot per layer)"
            )
    return source.read(path, _clt_layer_reader(layer, n_layers, where))


def _check_clt_type(source: FileSource, folder: str) -> None:
    """The folder's config.json, where there is one, must call it a CLT (crosscoders and
    single-layer SAEs sit beside the CLTs in the same repos)."""
    path = join(folder, "config.json")
    if source.fetch(path, required=False) is None:
        return
    kind = source.read(path, read_json).get("type", "clt")
    if kind != "clt":
        raise ValueError(
            f"{source.describe(path)}: type is {kind!r}, not 'clt'; layout gemma_scope_2_clt "
            "reads cross-layer transcoders only"
        )


def convert_gemma_scope_2_clt(source: FileSource, ctx: ConvertContext) -> Converted:
    """A Gemma Scope 2 cross-layer transcoder (folders such as `clt/width_262k_l0_big` and
    `clt/width_262k_l0_medium_affine`): `params_layer_<n>.safetensors` per layer n with
    w_enc [d_in, d_sae], b_enc, b_dec [d_out], threshold [d_sae] and w_dec [d_sae, n_layers,
    d_out] (a slot for every layer; those before n are not part of the CLT and are dropped,
    as circuit-tracer does), beside a config.json (architecture jump_relu, type clt,
    affine_connection). Loaded as saekit's `clt` (JumpReLU). The `_affine` CLTs also hold
    affine_skip_connection [d_in, d_out] per layer, added to that layer's output as x @ A:
    they load with `skip_connection` on, W_skip[n] = A.T."""
    folder = ctx.folder.strip("/")
    n_layers = 0
    while source.fetch(join(folder, CLT_FILE.format(layer=n_layers)), required=False):
        n_layers += 1
    if n_layers == 0:
        raise FileNotFoundError(
            f"{source.describe(folder or '.')} holds no {CLT_FILE.format(layer=0)}; a Gemma "
            "Scope 2 CLT has one params_layer_<n>.safetensors per layer"
        )
    first = join(folder, CLT_FILE.format(layer=0))
    affine = AFFINE in source.read(first, safetensors_header)
    _check_gemma_scope_2_config(source, folder, affine)
    _check_clt_type(source, folder)
    # A local folder given as the release itself has its name in the source, not in `folder`.
    if (folder or source.describe().rstrip("/")).endswith("_affine") != affine:
        raise ValueError(
            f"{source.describe(first)}: the folder name says {'an' if not affine else 'no'} "
            f"affine skip connection but the file holds {'one' if affine else 'none'} "
            f"({AFFINE}); the folder and its weights do not match"
        )
    stacked: dict[str, list[Tensor]] = {"W_enc": [], "b_enc": [], "b_dec": [], "threshold": []}
    skips: list[Tensor] = []
    tensors: dict[str, Tensor] = {}
    shapes: tuple[int, ...] | None = None
    for layer in bar(range(n_layers), desc="reading the CLT", unit="layer", delay=2.0):
        stored = _clt_layer_tensors(source, folder, layer, n_layers, affine)
        layer_shapes = (*stored["w_enc"].shape, stored["b_dec"].shape[0])
        if shapes is not None and layer_shapes != shapes:
            raise ValueError(
                f"{source.describe(join(folder, CLT_FILE.format(layer=layer)))}: [d_in, d_sae, "
                f"d_out] is {list(layer_shapes)}, but layer 0's is {list(shapes)}"
            )
        shapes = layer_shapes
        tensors[f"W_dec_{layer}"] = stored["w_dec"]
        stacked["W_enc"].append(stored["w_enc"])
        for key in ("b_enc", "b_dec", "threshold"):
            stacked[key].append(stored[key])
        if affine:
            # Stored [d_in, d_out] and added as x @ A; saekit's W_skip is [d_out, d_in].
            skips.append(stored[AFFINE].T)
    tensors.update({key: torch.stack(values) for key, values in stacked.items()})
    if affine:
        tensors["W_skip"] = torch.stack(skips).contiguous()
    d_in, d_sae = tensors["W_enc"].shape[1:]
    metadata = {
        **_GS2_METADATA,
        "model_name": ctx.model or _gemma3_model(ctx.repo_id),
        "hook_names": [f"blocks.{n}.ln2.hook_normalized" for n in range(n_layers)],
        "hook_names_out": [f"blocks.{n}.hook_mlp_out" for n in range(n_layers)],
    }
    cfg = {
        "architecture": "clt", "d_in": int(d_in), "d_sae": int(d_sae),
        "d_out": int(tensors["b_dec"].shape[1]),
        "dtype": dtype_name(tensors["W_enc"].dtype),
        "apply_b_dec_to_input": False, "normalize_activations": "none",
        "reshape_activations": "none", "n_layers": n_layers, "activation_fn": "jumprelu",
        "metadata": {k: v for k, v in metadata.items() if v is not None},
    }
    if affine:
        cfg["skip_connection"] = True
    return Converted(cfg, tensors)
