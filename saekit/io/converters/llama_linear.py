"""Single-file ReLU SAEs on a Llama residual stream, stored as two nn.Linear layers.

Goodfire (`Goodfire/Llama-3.1-8B-Instruct-SAE-l19`, `...-3.3-70B-Instruct-SAE-l50`): one
`<name>-l<layer>.pth`/`.pt` file with `encoder_linear.{weight,bias}` and
`decoder_linear.{weight,bias}`. qresearch's DeepSeek-R1-Distill-Llama-8B SAE: one
`<name>-l<layer>.pt` with `encoder.{weight,bias}` and `decoder.{weight,bias}`. Both compute
f = ReLU(x @ W_e.T + b_e) on the uncentred input and x_hat = f @ W_d.T + b_d, with W_e
[d_sae, d_in] and W_d [d_in, d_sae]; both read the output of decoder layer <layer>
(`blocks.<layer>.hook_resid_post`) and were trained on LMSYS-Chat-1M.
"""

from __future__ import annotations

from torch import Tensor

from saekit.io.converters.base import ConvertContext, Converted, current_cfg
from saekit.io.converters.dictionary_learning import read_torch_state
from saekit.io.converters.files import check_shape, exact_keys, layer_from
from saekit.io.sources import FileSource

_DATASET = "lmsys/lmsys-chat-1m"


def _linear_pair(stored: dict[str, Tensor], encoder: str, decoder: str, where: str) -> dict:
    names = (f"{encoder}.weight", f"{encoder}.bias", f"{decoder}.weight", f"{decoder}.bias")
    exact_keys(stored, names, where)
    d_sae, d_in = stored[names[0]].shape
    check_shape(stored[names[1]], (d_sae,), names[1], where)
    check_shape(stored[names[2]], (d_in, d_sae), names[2], where)
    check_shape(stored[names[3]], (d_in,), names[3], where)
    return {
        "W_enc": stored[names[0]].T.contiguous(),  # [d_in, d_sae]
        "b_enc": stored[names[1]],
        "W_dec": stored[names[2]].T.contiguous(),  # [d_sae, d_in]
        "b_dec": stored[names[3]],
    }


def _convert(
    source: FileSource, ctx: ConvertContext, encoder: str, decoder: str, extra: dict
) -> Converted:
    where = source.describe(ctx.folder)
    name = ctx.folder.rsplit("/", 1)[-1]
    layer = layer_from(name, r"-l(\d+)\.pth?$", where)
    tensors = _linear_pair(source.read(ctx.folder, read_torch_state), encoder, decoder, where)
    metadata = {
        "model_name": ctx.model,
        "hook_name": f"blocks.{layer}.hook_resid_post",
        "dataset_path": _DATASET,
        "prepend_bos": True,
        **extra,
    }
    return Converted(current_cfg("standard", tensors, metadata), tensors)


def convert_goodfire(source: FileSource, ctx: ConvertContext) -> Converted:
    return _convert(source, ctx, "encoder_linear", "decoder_linear", {})


def convert_deepseek_r1(source: FileSource, ctx: ConvertContext) -> Converted:
    return _convert(source, ctx, "encoder", "decoder", {"context_size": 1024})
