"""saekit's own layout (the sae-lens one): cfg.json + sae_weights.safetensors (+ sparsity)."""

from __future__ import annotations

from saekit.io.converters.base import ConvertContext, Converted, read_json
from saekit.io.native import (
    CFG_FILE,
    SPARSITY_FILE,
    WEIGHTS_FILE,
    fold_decoder_scales,
    read_safetensors,
)
from saekit.io.sources import FileSource, join


def convert_native(source: FileSource, ctx: ConvertContext) -> Converted:
    cfg = source.read(join(ctx.folder, CFG_FILE), read_json)
    weights = join(ctx.folder, WEIGHTS_FILE)
    tensors = fold_decoder_scales(
        source.read(weights, read_safetensors), source.describe(weights)
    )
    sparsity = None
    sparsity_path = join(ctx.folder, SPARSITY_FILE)
    if source.fetch(sparsity_path, required=False) is not None:
        stored = source.read(sparsity_path, read_safetensors)
        if "sparsity" not in stored:
            where = source.describe(sparsity_path)
            raise ValueError(f"{where} has no 'sparsity' tensor (found {sorted(stored)})")
        sparsity = stored["sparsity"]
    return Converted(cfg, tensors, sparsity)
