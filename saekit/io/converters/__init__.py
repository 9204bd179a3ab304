"""Readers for the file layouts SAEs are published in, each turning one into saekit's terms.

A converter takes a file source (local folder or Hub repo) and a context (folder in the repo,
repo id, model) and returns a cfg dict plus native tensors (`Converted`). `LAYOUTS` maps the
registry's layout names to converters; `detect_layout` guesses the layout of a folder that no
registry entry describes, from the files it holds.
"""

from __future__ import annotations

from collections.abc import Callable

from saekit.io.converters.base import ConvertContext, Converted
from saekit.io.converters.circuit_tracer import (
    convert_mntss_clt,
    convert_mntss_clt_layer,
    convert_mwhanna_transcoder,
)
from saekit.io.converters.connor_rob import convert_connor_rob_hook_z
from saekit.io.converters.dictionary_learning import convert_dictionary_learning
from saekit.io.converters.gemma_scope import (
    convert_gemma_scope,
    convert_gemma_scope_2,
    convert_gemma_scope_2_clt,
    convert_gemma_scope_transcoder,
)
from saekit.io.converters.llama_linear import convert_deepseek_r1, convert_goodfire
from saekit.io.converters.llama_scope import convert_llama_scope, convert_llama_scope_r1_distill
from saekit.io.converters.native import convert_native
from saekit.io.converters.qwen_scope import convert_qwen_scope
from saekit.io.converters.sparsify import convert_sparsify, is_sparsify_cfg
from saekit.io.converters.temporal import convert_temporal
from saekit.io.native import read_json
from saekit.io.sources import FileSource, join

Converter = Callable[[FileSource, ConvertContext], Converted]

LAYOUTS: dict[str, Converter] = {
    "native": convert_native,
    "gemma_scope": convert_gemma_scope,
    "gemma_scope_transcoder": convert_gemma_scope_transcoder,
    "gemma_scope_2": convert_gemma_scope_2,
    "gemma_scope_2_clt": convert_gemma_scope_2_clt,
    "llama_scope": convert_llama_scope,
    "llama_scope_r1_distill": convert_llama_scope_r1_distill,
    "dictionary_learning": convert_dictionary_learning,
    "sparsify": convert_sparsify,
    "qwen_scope": convert_qwen_scope,
    "goodfire": convert_goodfire,
    "deepseek_r1": convert_deepseek_r1,
    "connor_rob_hook_z": convert_connor_rob_hook_z,
    "mwhanna_transcoder": convert_mwhanna_transcoder,
    "mntss_clt_layer_transcoder": convert_mntss_clt_layer,
    "mntss_clt": convert_mntss_clt,
    "temporal": convert_temporal,
}

#: The first file found decides the layout (cfg.json is shared by native and sparsify).
_MARKERS = (
    ("cfg.json", None),
    ("params.npz", "gemma_scope"),
    ("params.safetensors", "gemma_scope_2"),
    ("hyperparams.json", "llama_scope"),
    ("ae.pt", "dictionary_learning"),
    # Whole cross-layer transcoders: one file per layer.
    ("params_layer_0.safetensors", "gemma_scope_2_clt"),
    ("W_enc_0.safetensors", "mntss_clt"),
)


def converter_for(layout: str, where: str = "") -> Converter:
    if layout in LAYOUTS:
        return LAYOUTS[layout]
    at = f" ({where})" if where else ""
    raise ValueError(
        f"SAE layout {layout!r}{at} is not supported by saekit yet; supported layouts: "
        f"{', '.join(LAYOUTS)}"
    )


def detect_layout(source: FileSource, folder: str) -> str:
    """The layout of `folder`, from the files it holds; errors say what was looked for."""
    for marker, layout in _MARKERS:
        path = join(folder, marker)
        if source.fetch(path, required=False) is None:
            continue
        if layout is None:
            return "sparsify" if is_sparsify_cfg(source.read(path, read_json)) else "native"
        return layout
    misses = getattr(source, "offline_misses", [])
    if misses:  # nothing found, but only because nothing could be checked
        raise FileNotFoundError(source.offline_message(misses[0]))  # type: ignore[attr-defined]
    markers = ", ".join(m for m, _ in _MARKERS)
    raise FileNotFoundError(
        f"{source.describe(folder or '.')} holds no SAE saekit can read (looked for {markers}); "
        "check the folder (sae_id), or pass layout=... naming one of " + ", ".join(LAYOUTS)
    )


__all__ = ["LAYOUTS", "ConvertContext", "Converted", "converter_for", "detect_layout"]
