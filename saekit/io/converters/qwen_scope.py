"""Qwen's Qwen-Scope releases: top-k SAEs on the residual stream of Qwen3 / Qwen3.5 models.

One repo per (model, width, k), named `Qwen/SAE-Res-<model>-W<width>K-L0_<k>`, with one torch
file per layer, `layer<n>.sae.pt`: a dict of W_enc [d_sae, d_in], W_dec [d_in, d_sae], b_enc
[d_sae] and b_dec [d_in]. The latents are the k largest of x @ W_enc.T + b_enc (ReLU'd, as
SAELens loads them), the input is not centred, and the reconstruction is f @ W_dec.T + b_dec.
The file holds no config: k and the width come from the repo name, the layer from the file
name (the output of decoder layer n, i.e. `blocks.n.hook_resid_post`).
"""

from __future__ import annotations

import re

from saekit.io.converters.base import ConvertContext, Converted, current_cfg
from saekit.io.converters.dictionary_learning import read_torch_state
from saekit.io.converters.files import check_shape, exact_keys, layer_from
from saekit.io.sources import FileSource

_REPO = re.compile(r"SAE-Res-(?P<model>.+)-W(?P<width>\d+)K-L0_(?P<k>\d+)$")


def convert_qwen_scope(source: FileSource, ctx: ConvertContext) -> Converted:
    where = source.describe(ctx.folder)
    match = _REPO.search(ctx.repo_id or "")
    if match is None:
        raise ValueError(
            f"{where}: a Qwen-Scope file records no k; load it from its Hub repo (named "
            f"Qwen/SAE-Res-<model>-W<width>K-L0_<k>), not from {ctx.repo_id or 'a local folder'}"
        )
    layer = layer_from(ctx.folder.rsplit("/", 1)[-1], r"^layer(\d+)\.sae\.pt$", where)
    stored = source.read(ctx.folder, read_torch_state)
    exact_keys(stored, ("W_enc", "W_dec", "b_enc", "b_dec"), where)
    d_sae, d_in = stored["W_enc"].shape
    width, k = int(match["width"]) * 1024, int(match["k"])
    if d_sae != width:
        raise ValueError(
            f"{where}: W_enc has {d_sae} latents but the repo name says W{match['width']}K "
            f"({width}); the file does not belong to this release"
        )
    check_shape(stored["W_dec"], (d_in, d_sae), "W_dec", where)
    check_shape(stored["b_enc"], (d_sae,), "b_enc", where)
    check_shape(stored["b_dec"], (d_in,), "b_dec", where)
    tensors = {
        "W_enc": stored["W_enc"].T.contiguous(),  # [d_in, d_sae]
        "b_enc": stored["b_enc"],
        "W_dec": stored["W_dec"].T.contiguous(),  # [d_sae, d_in]
        "b_dec": stored["b_dec"],
    }
    metadata = {
        "model_name": ctx.model or f"Qwen/{match['model']}",
        "hook_name": f"blocks.{layer}.hook_resid_post",
        "hf_hook_name": f"model.layers.{layer}",
        "prepend_bos": True,
        "context_size": 1024,
    }
    return Converted(current_cfg("topk", tensors, metadata, k=k), tensors)
