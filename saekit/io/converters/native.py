"""saekit's own layout (the sae-lens one): cfg.json + sae_weights.safetensors (+ sparsity),
read by the same code as `SAE.load` (`saekit.io.native.read_native`)."""

from __future__ import annotations

from saekit.io.converters.base import ConvertContext, Converted
from saekit.io.native import read_native
from saekit.io.sources import FileSource


def convert_native(source: FileSource, ctx: ConvertContext) -> Converted:
    folder = read_native(
        source, ctx.folder, check_shapes=ctx.check_shapes, overrides=ctx.config_overrides
    )
    return Converted(folder.cfg_dict, folder.tensors, folder.sparsity)
