"""TransformerLens hook names for Hugging Face models, family by family.

A `HookedTransformer` names the places in a forward pass (`blocks.3.hook_resid_mid`,
`blocks.3.attn.hook_z`); a Hugging Face model has modules instead. This module says, for each
family saekit knows, which module input or output holds the tensor TransformerLens's hook holds
for the same weights, so that an SAE trained on a TransformerLens hook reads the same
activations from the Hugging Face model. Every mapping is checked against TransformerLens on
random-weight models in `tests/models/test_aliases.py`.

Semantics followed (TransformerLens 3, weights loaded without processing):

- `hook_embed`: the token embedding, before any positional embedding; for Gemma it includes
  the sqrt(d_model) scale (TransformerLens folds the scale into W_E, transformers scales in the
  embedding module). `hook_pos_embed`: the learned positional embedding (GPT-2, OPT).
- `blocks.N.hook_attn_out` / `hook_mlp_out`: what attention / the MLP add to the residual
  stream, after the post-norms of Gemma 2 and 3.
- `blocks.N.hook_resid_mid`: the residual stream between attention and MLP. Models whose
  attention and MLP run in parallel (GPT-J, GPT-NeoX with use_parallel_residual) have none,
  as in TransformerLens.
- `blocks.N.attn.hook_z`: the attention-weighted values of each head,
  [batch, pos, n_heads, d_head], i.e. the input of the output projection.
- `blocks.N.mlp.hook_pre`: the MLP pre-activation (the gate projection for gated MLPs);
  `blocks.N.mlp.hook_post`: the activation after the nonlinearity (act(gate) * up for gated
  MLPs), i.e. the input of the down projection.
- `blocks.N.ln1.hook_normalized`, `blocks.N.ln2.hook_normalized`,
  `ln_final.hook_normalized`: the norm's input normalized, *before* the norm's weight and bias,
  as TransformerLens's LayerNorm / RMSNorm hook it. (With TransformerLens's default weight
  processing the weights are folded away, so this is also what SAEs trained on
  `from_pretrained` models saw.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from torch import nn

End = Literal["input", "output"]
NormKind = Literal["layer", "rms"]

_LAYER_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_GLOBAL_TL_HOOKS = ("hook_embed", "hook_pos_embed", "ln_final.hook_normalized")


@dataclass(frozen=True)
class HookSite:
    """Where a hook's activation lives in a torch model.

    Attributes:
        path: the module's path, as `model.named_modules()` gives it.
        end: "input" (the module's first input) or "output" (its first output).
        n_heads: split the last dimension into [n_heads, d_head] (per-head hooks).
        norm: the module is a norm and the hook is its input normalized, before the norm's
            weight and bias ("layer": LayerNorm, "rms": RMSNorm).
        norm_offset: added to an RMSNorm's weight when it is applied (1 for Gemma, whose norms
            scale by 1 + weight).
        via_residual: (block path, adder path) when the activation is a residual stream that
            no module outputs as a whole, block input + adder output (resid_mid): `path` /
            `end` read it, and a replacement changes the adder's output so the sum becomes
            the replacement.
        write_to: for a norm site whose output also feeds modules its TransformerLens hook
            does not (GPT-J's ln_1 feeds attention and MLP, TransformerLens's ln1 attention
            only): the module whose input a replacement changes instead of the norm's output.
    """

    path: str
    end: End
    n_heads: int | None = None
    norm: NormKind | None = None
    norm_offset: float = 0.0
    via_residual: tuple[str, str] | None = None
    write_to: str | None = None


@dataclass(frozen=True)
class _Layout:
    """Where one family's TransformerLens hooks sit. Block entries are relative to a decoder
    block, the others to the module holding the block stack; None: the family has no such
    place. `(path, end)` pairs name a module input or output."""

    attn_out: tuple[str, End]
    resid_mid: tuple[str, End] | None
    mlp_out: tuple[str, End]
    o_proj: str
    attn: str
    mlp_in: str | None
    down_proj: str
    ln1: str | None
    ln2: str | None
    embed: str | None
    pos_embed: str | None
    final_norm: str | None
    norm: NormKind
    norm_offset: float = 0.0
    no_resid_mid_reason: str = ""


_LLAMA = _Layout(
    attn_out=("self_attn", "output"), resid_mid=("post_attention_layernorm", "input"),
    mlp_out=("mlp", "output"), o_proj="self_attn.o_proj", attn="self_attn", mlp_in="mlp.gate_proj",
    down_proj="mlp.down_proj", ln1="input_layernorm", ln2="post_attention_layernorm",
    embed="embed_tokens", pos_embed=None, final_norm="norm", norm="rms",
)
_GEMMA = replace(_LLAMA, norm_offset=1.0)
# Gemma 2 and 3 normalise the attention and MLP outputs before adding them to the residual
# stream; TransformerLens's hook_attn_out / hook_mlp_out come after those norms.
_GEMMA2 = replace(
    _GEMMA,
    attn_out=("post_attention_layernorm", "output"),
    resid_mid=("pre_feedforward_layernorm", "input"),
    mlp_out=("post_feedforward_layernorm", "output"),
    ln2="pre_feedforward_layernorm",
)
_PHI3 = replace(_LLAMA, mlp_in=None)  # gate and up share one projection
_GPT2 = _Layout(
    attn_out=("attn", "output"), resid_mid=("ln_2", "input"), mlp_out=("mlp", "output"),
    o_proj="attn.c_proj", attn="attn", mlp_in="mlp.c_fc", down_proj="mlp.c_proj", ln1="ln_1",
    ln2="ln_2", embed="wte", pos_embed="wpe", final_norm="ln_f", norm="layer",
)
_PARALLEL = (
    "attention and MLP read the same input in parallel, so there is no residual stream "
    "between them (TransformerLens has no hook_resid_mid for such models either)"
)
_GPTJ = _Layout(
    attn_out=("attn", "output"), resid_mid=None, mlp_out=("mlp", "output"),
    o_proj="attn.out_proj", attn="attn", mlp_in="mlp.fc_in", down_proj="mlp.fc_out", ln1="ln_1",
    # Attention and MLP share ln_1: there is no separate ln2 to hook.
    ln2=None, embed="wte", pos_embed=None, final_norm="ln_f", norm="layer",
    no_resid_mid_reason=_PARALLEL,
)
_NEOX = _Layout(
    attn_out=("attention", "output"), resid_mid=("post_attention_layernorm", "input"),
    mlp_out=("mlp", "output"), o_proj="attention.dense", attn="attention",
    mlp_in="mlp.dense_h_to_4h", down_proj="mlp.dense_4h_to_h", ln1="input_layernorm",
    ln2="post_attention_layernorm", embed="embed_in", pos_embed=None,
    final_norm="final_layer_norm", norm="layer",
)
_NEOX_PARALLEL = replace(_NEOX, resid_mid=None, no_resid_mid_reason=_PARALLEL)
_OPT = _Layout(
    attn_out=("self_attn", "output"), resid_mid=("final_layer_norm", "input"),
    mlp_out=("fc2", "output"), o_proj="self_attn.out_proj", attn="self_attn", mlp_in="fc1",
    down_proj="fc2",
    ln1="self_attn_layer_norm", ln2="final_layer_norm", embed="embed_tokens",
    pos_embed="embed_positions", final_norm="final_layer_norm", norm="layer",
)

#: Display names of the families with TransformerLens names beyond resid_pre / resid_post.
FAMILY_NAMES: dict[str, str] = {
    "gpt2": "GPT-2", "gpt_neox": "GPT-NeoX", "gptj": "GPT-J", "opt": "OPT", "llama": "Llama",
    "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma": "Gemma",
    "gemma2": "Gemma 2", "gemma3_text": "Gemma 3", "phi3": "Phi-3",
}


def _layout(config: Any) -> _Layout | None:
    model_type = getattr(config, "model_type", None)
    if model_type == "gpt_neox":
        return _NEOX_PARALLEL if getattr(config, "use_parallel_residual", True) else _NEOX
    if model_type == "opt":
        # Post-norm OPT (opt-350m) normalises after the residual addition; TransformerLens
        # does not load it, and its hooks would mean something else.
        if not getattr(config, "do_layer_norm_before", True):
            return None
        if getattr(config, "word_embed_proj_dim", None) not in (None, config.hidden_size):
            return None
        return _OPT
    return {
        "gpt2": _GPT2, "gptj": _GPTJ, "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA,
        "qwen3": _LLAMA, "gemma": _GEMMA, "gemma2": _GEMMA2, "gemma3_text": _GEMMA2,
        "phi3": _PHI3,
    }.get(model_type)


def find_block_stack(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(path, blocks) of the one ModuleList holding the model's transformer blocks, or None
    when there is none or several could be it."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    n_layers = getattr(config, "num_hidden_layers", None)
    if n_layers is None:
        return None
    stacks = [
        (path, module)
        for path, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n_layers
    ]
    # Lists inside the blocks (T5's sublayers) are not the stack, whatever their length.
    outer = [
        (path, module)
        for path, module in stacks
        if not any(path.startswith(other + ".") for other, _ in stacks)
    ]
    return outer[0] if len(outer) == 1 else None


@dataclass
class AliasTable:
    """The TransformerLens names one model answers to.

    Attributes:
        family: the model's `model_type` when saekit knows its layout, else None.
        sites: {TransformerLens hook name: where it lives}, in forward order.
        absent: {hook name: why this model has no such hook}, for names a user may expect.
    """

    family: str | None
    sites: dict[str, HookSite] = field(default_factory=dict)
    absent: dict[str, str] = field(default_factory=dict)
    model_type: str | None = None

    def explain(self, name: str) -> str | None:
        """Why `name` is not a hook of this model, when it is a TransformerLens name that
        other models have; None otherwise."""
        if name in self.absent:
            return self.absent[name]
        match = _LAYER_HOOK.match(name)
        tl_style = match is not None or name in _GLOBAL_TL_HOOKS
        if not tl_style or self.family is not None:
            return None
        if not self.sites:
            return (
                "this model has no single stack of transformer blocks for TransformerLens names "
                "to refer to; name a module instead (see backend.hook_names())"
            )
        known = ", ".join(FAMILY_NAMES.values())
        return (
            f"saekit maps only blocks.N.hook_resid_pre / hook_resid_post for this model "
            f"(model_type {self.model_type!r}); the other TransformerLens names are known for "
            f"{known}. Name a module instead (see backend.hook_names())"
        )


def transformer_lens_aliases(model: nn.Module) -> AliasTable:
    """The TransformerLens hook names of a Hugging Face model and where each one lives."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    model_type = getattr(config, "model_type", None)
    stack = find_block_stack(model)
    if stack is None:
        return AliasTable(family=None, model_type=model_type)
    stack_path, blocks = stack
    modules = dict(model.named_modules())
    layout = _layout(config)
    table = AliasTable(family=model_type if layout is not None else None, model_type=model_type)
    parent = stack_path.rpartition(".")[0]

    def join(*parts: str) -> str:
        return ".".join(p for p in parts if p)

    def add(name: str, site: HookSite) -> None:
        if site.path in modules:
            table.sites[name] = site

    if layout is None:
        for i in range(len(blocks)):
            add(f"blocks.{i}.hook_resid_pre", HookSite(f"{stack_path}.{i}", "input"))
            add(f"blocks.{i}.hook_resid_post", HookSite(f"{stack_path}.{i}", "output"))
        return table

    n_heads = getattr(config, "num_attention_heads", None)

    def norm_site(path: str, write_to: str | None = None) -> HookSite:
        return HookSite(
            path, "output", norm=layout.norm, norm_offset=layout.norm_offset, write_to=write_to
        )

    if layout.embed is not None:
        embed = join(parent, layout.embed)
        if model_type in ("gemma", "gemma2", "gemma3_text") and not hasattr(
            modules.get(embed), "embed_scale"
        ):
            table.absent["hook_embed"] = (
                "this version of transformers scales Gemma's embeddings outside the embedding "
                "module; use blocks.0.hook_resid_pre (the scaled embedding) instead"
            )
        else:
            add("hook_embed", HookSite(embed, "output"))
    if layout.pos_embed is not None:
        add("hook_pos_embed", HookSite(join(parent, layout.pos_embed), "output"))
    for i in range(len(blocks)):
        block = f"{stack_path}.{i}"
        pre = f"blocks.{i}."
        add(pre + "hook_resid_pre", HookSite(block, "input"))
        if layout.ln1 is not None:
            # Where ln1 also feeds the MLP (no ln2), a replacement must reach attention only.
            write_to = f"{block}.{layout.attn}" if layout.ln2 is None else None
            add(pre + "ln1.hook_normalized", norm_site(f"{block}.{layout.ln1}", write_to))
        add(pre + "attn.hook_z", HookSite(f"{block}.{layout.o_proj}", "input", n_heads=n_heads))
        add(pre + "hook_attn_out", HookSite(f"{block}.{layout.attn_out[0]}", layout.attn_out[1]))
        if layout.resid_mid is not None:
            # Read where the MLP's norm receives it; replace through attention's addition.
            site = HookSite(
                f"{block}.{layout.resid_mid[0]}", layout.resid_mid[1],
                via_residual=(block, f"{block}.{layout.attn_out[0]}"),
            )
            add(pre + "hook_resid_mid", site)
        else:
            table.absent[pre + "hook_resid_mid"] = layout.no_resid_mid_reason
        if layout.ln2 is not None:
            add(pre + "ln2.hook_normalized", norm_site(f"{block}.{layout.ln2}"))
        if layout.mlp_in is not None:
            add(pre + "mlp.hook_pre", HookSite(f"{block}.{layout.mlp_in}", "output"))
        add(pre + "mlp.hook_post", HookSite(f"{block}.{layout.down_proj}", "input"))
        add(pre + "hook_mlp_out", HookSite(f"{block}.{layout.mlp_out[0]}", layout.mlp_out[1]))
        add(pre + "hook_resid_post", HookSite(block, "output"))
    if layout.final_norm is not None:
        add("ln_final.hook_normalized", norm_site(join(parent, layout.final_norm)))
    return table
