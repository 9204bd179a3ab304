"""Connor Kissane and Rob Krzyzanowski's attention-output SAEs on GPT-2 small (hook_z).

One torch file per layer, `<run name>.pt`, holding W_enc [d_in, d_sae], b_enc [d_sae], W_dec
[d_sae, d_in] and b_dec [d_in], beside `<run name>_cfg.json` (act_size = d_in, dict_size =
d_sae, act_name = the hook). The SAE reads the heads' outputs before the output projection,
concatenated (n_heads * d_head = act_size), centred by b_dec: f = ReLU((x - b_dec) @ W_enc +
b_enc), x_hat = f @ W_dec + b_dec. Trained on OpenWebText with 128-token contexts.
"""

from __future__ import annotations

from saekit.io.converters.base import ConvertContext, Converted, check_types, current_cfg
from saekit.io.converters.dictionary_learning import read_torch_state
from saekit.io.converters.files import check_shape, exact_keys
from saekit.io.native import read_json
from saekit.io.sources import FileSource

_CFG_KINDS = {"act_size": "an integer", "dict_size": "an integer", "act_name": "a string"}


def convert_connor_rob_hook_z(source: FileSource, ctx: ConvertContext) -> Converted:
    if not ctx.folder.endswith(".pt"):
        raise ValueError(
            f"{source.describe(ctx.folder)}: a connor_rob_hook_z SAE is one .pt file; give "
            "its path as sae_id"
        )
    cfg_path = ctx.folder.removesuffix(".pt") + "_cfg.json"
    raw = source.read(cfg_path, read_json)
    where_cfg = source.describe(cfg_path)
    check_types(raw, _CFG_KINDS, where_cfg, tuple(_CFG_KINDS))
    hook = raw["act_name"]
    if not hook.endswith("hook_z"):
        raise ValueError(
            f"{where_cfg}: act_name is {hook!r}; this layout holds hook_z SAEs only"
        )
    where = source.describe(ctx.folder)
    stored = source.read(ctx.folder, read_torch_state)
    exact_keys(stored, ("W_enc", "b_enc", "W_dec", "b_dec"), where)
    d_in, d_sae = raw["act_size"], raw["dict_size"]
    check_shape(stored["W_enc"], (d_in, d_sae), "W_enc", where)
    check_shape(stored["b_enc"], (d_sae,), "b_enc", where)
    check_shape(stored["W_dec"], (d_sae, d_in), "W_dec", where)
    check_shape(stored["b_dec"], (d_in,), "b_dec", where)
    tensors = {name: stored[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    metadata = {
        "model_name": ctx.model or "gpt2-small",
        "hook_name": hook,
        "dataset_path": "Skylion007/openwebtext",
        "context_size": 128,
        "prepend_bos": True,
    }
    cfg = current_cfg(
        "standard", tensors, metadata, apply_b_dec_to_input=True, reshape_activations="hook_z"
    )
    return Converted(cfg, tensors)
