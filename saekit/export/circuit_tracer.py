"""`export_circuit_tracer`: per-layer transcoders as a circuit-tracer transcoder set;
`export_circuit_tracer_clt`: a cross-layer transcoder in circuit-tracer's CLT layout.

circuit-tracer reads a folder (or Hub repo) holding

    config.yaml               model_kind: transcoder_set, model_name, feature_input_hook and
                              feature_output_hook (hook names inside a block, e.g.
                              ln2.hook_normalized, hook_mlp_out), optionally activation
                              (relu) and transcoders (the layer files, in layer order)
    layer_<n>.safetensors     one per layer n = 0 .. L-1, every layer present:
                              W_enc [d_sae, d_model]   pre = x @ W_enc.T + b_enc
                              b_enc [d_sae]
                              W_dec [d_sae, d_model]   out = f @ W_dec + b_dec
                              b_dec [d_model]
                              W_skip [d_model, d_model]  (skip transcoders: out += x @ W_skip.T)
                              activation_function.threshold [d_sae]  (JumpReLU:
                              f = pre * (pre > threshold); without it f = ReLU(pre))

saekit keeps W_enc as [d_in, d_sae], so it is transposed; the other tensors keep their shapes.
saekit's JumpReLU is ReLU(pre) * (pre > threshold), which equals circuit-tracer's rule with the
threshold raised to at least 0, so negative thresholds are written as 0. An SAE that subtracts
b_dec from its input has that folded into b_enc (circuit-tracer has no such step).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import Tensor

from saekit.export.folder import check_export_folder, staged_folder
from saekit.progress import bar
from saekit.saes.base import SAE
from saekit.saes.clt import CrossLayerTranscoder

CONFIG_FILE = "config.yaml"
#: saekit architectures circuit-tracer computes exactly, and whether each has a threshold.
SUPPORTED = {
    "transcoder": False, "skip_transcoder": False,
    "jumprelu_transcoder": True, "jumprelu_skip_transcoder": True,
}


def layer_file(layer: int) -> str:
    return f"layer_{layer}.safetensors"


@dataclass(frozen=True)
class Placement:
    """Where a transcoder sits: its block and the hook names inside that block."""

    layer: int
    hook_in: str
    hook_out: str


def placement(sae: SAE, where: str = "the SAE") -> Placement:
    """The block and in-block hooks of a transcoder, from its metadata."""
    meta = sae.cfg.metadata
    found = []
    for field, hook in (("hook_name", meta.hook_name), ("hook_name_out", meta.hook_name_out)):
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook or "")
        if match is None:
            raise ValueError(
                f"{where}: metadata {field} is {hook!r}, but circuit-tracer needs a hook inside "
                "a block (blocks.<n>.<hook>); set it in the SAE's cfg.json"
            )
        found.append((int(match.group(1)), match.group(2)))
    (layer_in, hook_in), (layer_out, hook_out) = found
    if layer_in != layer_out:
        raise ValueError(
            f"{where} reads block {layer_in} and writes block {layer_out}; circuit-tracer's "
            "per-layer transcoders read and write the same block"
        )
    return Placement(layer_in, hook_in, hook_out)


def check_transcoder(sae: SAE, where: str = "the SAE") -> None:
    """Refuse what circuit-tracer cannot compute exactly, naming what to change."""
    cfg = sae.cfg
    if cfg.architecture not in SUPPORTED:
        kind = "transcoder" if getattr(sae, "is_transcoder", False) else "SAE"
        raise ValueError(
            f"{where} is a '{cfg.architecture}' {kind}; circuit-tracer takes per-layer "
            f"transcoders with a ReLU or JumpReLU activation ({', '.join(SUPPORTED)})"
        )
    if cfg.output_width != cfg.d_in:
        raise ValueError(
            f"{where} reads {cfg.d_in} features and writes {cfg.output_width}; circuit-tracer's "
            "transcoders read and write the residual width (d_in must equal d_out)"
        )
    if cfg.normalize_activations != "none":
        raise ValueError(
            f"{where} normalises its input ({cfg.normalize_activations}), which circuit-tracer "
            "does not do; only transcoders with normalize_activations 'none' can be exported"
        )
    if cfg.reshape_activations != "none" or cfg.metadata.hook_head_index is not None:
        raise ValueError(f"{where} reads per-head activations; circuit-tracer reads whole "
                         "activations at a hook")


@torch.no_grad()
def circuit_tracer_tensors(sae: SAE) -> dict[str, Tensor]:
    """The transcoder's tensors under circuit-tracer's names and shapes (see the module
    docstring), on the CPU in the SAE's dtype."""
    W_enc = sae.W_enc.detach()
    b_enc = sae.b_enc.detach()
    if sae.cfg.apply_b_dec_to_input:
        b_enc = b_enc - sae.b_dec.detach() @ W_enc  # (x - b_dec) W + b = x W + (b - b_dec W)
    tensors = {
        "W_enc": W_enc.T,  # [d_sae, d_model]
        "b_enc": b_enc,
        "W_dec": sae.W_dec.detach(),  # [d_sae, d_model]
        "b_dec": sae.b_dec.detach(),
    }
    if SUPPORTED[sae.cfg.architecture]:
        tensors["activation_function.threshold"] = sae.threshold.detach().clamp_min(0)
    if hasattr(sae, "W_skip"):
        tensors["W_skip"] = sae.W_skip.detach()  # [d_model, d_model], applied as x @ W_skip.T
    return {name: t.cpu().contiguous() for name, t in tensors.items()}


def export_circuit_tracer(
    saes: Sequence[SAE],
    out: str | Path,
    *,
    model_name: str | None = None,
    names: Sequence[str] | None = None,
    local_paths: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Path:
    """Write one transcoder per layer as circuit-tracer's transcoder set; returns `out`.

    `saes` hold exactly one transcoder for each block 0..L-1 (any order), all with the same
    hooks inside the block, the same width and the same skip path (or none). `model_name`
    (default: the transcoders' metadata) is the Hugging Face id circuit-tracer loads the model
    by. `names` name the SAEs in errors (e.g. the paths they came from). `local_paths` lists
    the absolute paths of the layer files in config.yaml, so that circuit-tracer loads the
    folder where it is; without it the folder is laid out for a Hub repo (circuit-tracer
    finds `layer_<n>.safetensors` beside config.yaml). Everything is checked before anything
    is written.
    """
    if not saes:
        raise ValueError("no transcoders given; pass one per layer")
    labels = list(names) if names is not None else [f"SAE #{i}" for i in range(len(saes))]
    places: dict[int, tuple[SAE, str]] = {}
    for sae, label in zip(saes, labels, strict=True):
        check_transcoder(sae, label)
        place = placement(sae, label)
        if place.layer in places:
            raise ValueError(
                f"{label} and {places[place.layer][1]} both sit at layer {place.layer}; "
                "circuit-tracer takes one transcoder per layer"
            )
        places[place.layer] = (sae, label)
    missing = sorted(set(range(max(places) + 1)) - set(places))
    if missing:
        raise ValueError(
            f"no transcoder for layer(s) {missing}; circuit-tracer needs one for every layer "
            f"from 0 to {max(places)}"
        )
    first, first_label = places[0]
    first_place = placement(first)
    for sae, label in places.values():
        place = placement(sae)
        if (place.hook_in, place.hook_out) != (first_place.hook_in, first_place.hook_out):
            raise ValueError(
                f"{label} reads {place.hook_in} and writes {place.hook_out} but {first_label} "
                f"reads {first_place.hook_in} and writes {first_place.hook_out}; a transcoder "
                "set has one pair of hooks"
            )
        for what in ("d_in", "d_sae"):
            if getattr(sae.cfg, what) != getattr(first.cfg, what):
                raise ValueError(
                    f"{label} has {what}={getattr(sae.cfg, what)} but {first_label} has "
                    f"{getattr(first.cfg, what)}; every layer of a set has the same sizes"
                )
        if hasattr(sae, "W_skip") != hasattr(first, "W_skip"):
            raise ValueError(
                f"{label} and {first_label} differ in having a skip path; circuit-tracer takes "
                "a set whose transcoders all have one or none has"
            )
    model = model_name or first.cfg.metadata.model_name
    if not model:
        raise ValueError("the transcoders' metadata names no model; pass model_name= "
                         "(--model-name), the Hugging Face id of the model")
    others = {s.cfg.metadata.model_name for s, _ in places.values()} - {model, None}
    if others and model_name is None:
        raise ValueError(
            f"the transcoders name different models ({', '.join(sorted(others | {model}))}); "
            "pass model_name= (--model-name) to say which one they all read"
        )
    check_export_folder(out, overwrite)
    config: dict[str, object] = {
        "model_kind": "transcoder_set",
        "model_name": model,
        "feature_input_hook": first_place.hook_in,
        "feature_output_hook": first_place.hook_out,
    }
    if not any(SUPPORTED[s.cfg.architecture] for s, _ in places.values()):
        config["activation"] = "relu"  # with thresholds, each layer's file decides instead
    final = Path(out).expanduser().resolve()
    if local_paths:
        config["transcoders"] = [str(final / layer_file(n)) for n in sorted(places)]
    from safetensors.torch import save_file

    with staged_folder(out, overwrite) as folder:
        for layer in bar(sorted(places), desc="circuit-tracer export", unit="layer",
                         progress=progress):
            save_file(circuit_tracer_tensors(places[layer][0]), str(folder / layer_file(layer)))
        (folder / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
    return final


def clt_file(kind: str, layer: int) -> str:
    """`W_enc_<n>.safetensors` or `W_dec_<n>.safetensors`: a CLT layer's files."""
    return f"{kind}_{layer}.safetensors"


def _clt_in_block_hooks(clt: CrossLayerTranscoder, where: str) -> tuple[str, str]:
    """The in-block hook names every layer of the CLT shares (circuit-tracer has one pair),
    checking that layer n reads and writes block n."""
    from saekit.saes.clt import clt_hooks

    pairs = set()
    for layer, (hook_in, hook_out) in enumerate(zip(*clt_hooks(clt), strict=True)):
        names = []
        for hook in (hook_in, hook_out):
            match = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook)
            if match is None or int(match.group(1)) != layer:
                raise ValueError(
                    f"{where}: CLT layer {layer} hooks {hook!r}, but circuit-tracer needs "
                    f"layer n to read and write block n (blocks.{layer}.<hook>)"
                )
            names.append(match.group(2))
        pairs.add(tuple(names))
    if len(pairs) != 1:
        raise ValueError(f"{where}: the layers use different hooks {sorted(pairs)}; "
                         "circuit-tracer takes one input and one output hook for all layers")
    hook_in, hook_out = pairs.pop()
    return hook_in, hook_out


def export_circuit_tracer_clt(
    clt: CrossLayerTranscoder,
    out: str | Path,
    *,
    model_name: str | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Path:
    """Write a cross-layer transcoder in circuit-tracer's CLT layout; returns `out`.

    The folder holds config.yaml (model_kind: cross_layer_transcoder, model_name,
    feature_input_hook, feature_output_hook) and, per layer n, `W_enc_<n>.safetensors`
    (W_enc_<n> [d_sae, d_model], b_enc_<n>, b_dec_<n>, for JumpReLU threshold_<n>, raised
    to at least 0 as for per-layer transcoders, and with a skip connection W_skip_<n>
    [d_model, d_model], which circuit-tracer applies as x @ W_skip_<n>, so saekit's
    W_skip[n] transposed) and `W_dec_<n>.safetensors`
    (W_dec_<n> [d_sae, n_layers - n, d_model], as saekit holds it). circuit-tracer computes
    ReLU and JumpReLU CLTs; a topk CLT is refused (train batchtopk, published as JumpReLU).
    The CLT must span blocks 0..n_layers-1, layer n reading and writing block n."""
    where = "the CLT"
    if not isinstance(clt, CrossLayerTranscoder):
        raise ValueError(f"{where} is a {clt.cfg.architecture!r} SAE, not a cross-layer "
                         "transcoder; use export_circuit_tracer for per-layer transcoders")
    clt = clt.published()  # type: ignore[assignment]
    if clt.activation_fn not in ("relu", "jumprelu"):
        raise ValueError(
            f"{where} uses {clt.activation_fn}, which circuit-tracer does not compute; it "
            "takes ReLU and JumpReLU CLTs (a batchtopk CLT is published as JumpReLU)"
        )
    if clt.cfg.output_width != clt.cfg.d_in:
        raise ValueError(f"{where} reads {clt.cfg.d_in} features and writes "
                         f"{clt.cfg.output_width}; circuit-tracer's CLTs read and write d_model")
    hook_in, hook_out = _clt_in_block_hooks(clt, where)
    model = model_name or clt.cfg.metadata.model_name
    if not model:
        raise ValueError("the CLT's metadata names no model; pass model_name=, the Hugging "
                         "Face id of the model")
    check_export_folder(out, overwrite)
    config = {
        "model_kind": "cross_layer_transcoder",
        "model_name": model,
        "feature_input_hook": hook_in,
        "feature_output_hook": hook_out,
    }
    from safetensors.torch import save_file

    with torch.no_grad(), staged_folder(out, overwrite) as folder:
        for n in bar(range(clt.n_layers), desc="circuit-tracer CLT export", unit="layer",
                     progress=progress):
            enc = {
                f"W_enc_{n}": clt.W_enc[n].T,  # [d_sae, d_model]
                f"b_enc_{n}": clt.b_enc[n],
                f"b_dec_{n}": clt.b_dec[n],
            }
            if clt.activation_fn == "jumprelu":
                enc[f"threshold_{n}"] = clt.threshold[n].clamp_min(0)
            if clt.has_skip:
                enc[f"W_skip_{n}"] = clt.W_skip[n].T  # [d_in, d_out]
            dec = {f"W_dec_{n}": getattr(clt, f"W_dec_{n}")}
            for name, tensors in (("W_enc", enc), ("W_dec", dec)):
                plain = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
                save_file(plain, str(folder / clt_file(name, n)))
        (folder / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
    return Path(out).expanduser().resolve()
