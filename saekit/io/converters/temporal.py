"""Temporal SAEs (canrager/temporalSAEs; Lubana et al. 2025, arXiv 2511.01836).

Each SAE is a folder with `conf.yaml` (llm.dimin, sae.exp_factor, sae.n_heads,
sae.n_attn_layers, sae.bottleneck_factor, sae.sae_diff_type, sae.kval_topk, sae.tied_weights,
sae.scaling_factor, data.dtype) and `latest_ckpt.safetensors` (D, b, optionally E, and
attn_layers.*). Its latents on a token are the sparse code of what attention layers over the
earlier tokens' codes could not predict, so they depend on the whole context, not on the
token's activation alone. saekit's SAEs map one activation to one code, so this converter
reads and checks the config, then refuses with that reason instead of loading a wrong SAE.
"""

from __future__ import annotations

from saekit.io.converters.base import ConvertContext, Converted
from saekit.io.converters.files import read_yaml
from saekit.io.sources import FileSource, join


def convert_temporal(source: FileSource, ctx: ConvertContext) -> Converted:
    cfg_path = join(ctx.folder, "conf.yaml")
    where = source.describe(cfg_path)
    raw = source.read(cfg_path, read_yaml)
    sae = raw.get("sae")
    if not isinstance(sae, dict) or "n_attn_layers" not in sae:
        raise ValueError(f"{where} has no sae.n_attn_layers; it does not describe a temporal SAE")
    raise ValueError(
        f"{source.describe(ctx.folder)} is a temporal SAE: {sae['n_attn_layers']} attention "
        "layer(s) over the earlier tokens predict part of each token's code, so its latents "
        "depend on the context, which saekit's per-token SAEs cannot represent; saekit "
        "cannot load it yet (SAELens's TemporalSAE can)"
    )
