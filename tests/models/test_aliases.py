"""TransformerLens hook names on the Hugging Face backend, checked against TransformerLens.

For every decoder family, a tiny random-weight model folder (tests/models/families.py) is
loaded twice: with `load_model` (the Hugging Face backend) and as a `HookedTransformer` built
from the same weights by TransformerLens's own converters, without weight processing (no
LayerNorm folding, no centring), so both compute the same function. Each alias the backend
offers must hold TransformerLens's activation for that name (float32, atol 1e-5, rtol 1e-4),
and replacing it must change the logits exactly as replacing TransformerLens's hook does.

TransformerLens reads the config of GPT-2, GPT-NeoX, GPT-J, OPT, Llama, Mistral, Qwen2, Qwen3
and Phi-3 from the folder itself; for Gemma 1-3 it only knows the official checkpoints by
name, so the `HookedTransformerConfig` is written here from the Hugging Face config, with the
fields TransformerLens's own Gemma entries set. All of it runs offline.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from families import DECODER_FAMILIES, VOCAB_SIZE

from saekit.models import HFBackend, load_model

ATOL, RTOL = 1e-5, 1e-4

_BASE = ["hook_embed", "ln_final.hook_normalized"] + [
    f"blocks.{i}.{name}"
    for i in range(2)
    for name in (
        "hook_resid_pre", "ln1.hook_normalized", "attn.hook_z", "hook_attn_out",
        "hook_resid_mid", "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_post",
        "hook_mlp_out", "hook_resid_post",
    )
]


def _without(*parts: str) -> set[str]:
    return {name for name in _BASE if not any(name.endswith(p) for p in parts)}


#: The TransformerLens names each family's backend must offer.
EXPECTED_ALIASES: dict[str, set[str]] = {
    "gpt2": _without() | {"hook_pos_embed"},
    "gpt_neox": _without("hook_resid_mid"),
    "gpt_neox_sequential": _without(),
    "gptj": _without("hook_resid_mid", "ln2.hook_normalized"),
    "opt": _without() | {"hook_pos_embed"},
    "llama": _without(),
    "mistral": _without(),
    "qwen2": _without(),
    "qwen3": _without(),
    "gemma": _without(),
    "gemma2": _without(),
    "gemma3": _without(),
    "phi3": _without("mlp.hook_pre"),
}
assert set(EXPECTED_ALIASES) == set(DECODER_FAMILIES)


def _rope_theta(config: Any, layer_type: str | None = None) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None and layer_type in params:
        params = params[layer_type]
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _gemma_tl_config(config: Any) -> Any:
    """A HookedTransformerConfig for a Gemma model, from its Hugging Face config, set as
    TransformerLens's own entries for google/gemma-2b, gemma-2-2b and gemma-3-1b are."""
    from transformer_lens import HookedTransformerConfig

    version = {"gemma": 1, "gemma2": 2, "gemma3_text": 3}[config.model_type]
    fields: dict[str, Any] = dict(
        d_model=config.hidden_size, d_head=config.head_dim, n_heads=config.num_attention_heads,
        d_mlp=config.intermediate_size, n_layers=config.num_hidden_layers,
        n_ctx=config.max_position_embeddings, eps=config.rms_norm_eps,
        d_vocab=config.vocab_size, act_fn=config.hidden_activation, normalization_type="RMS",
        positional_embedding_type="rotary", rotary_dim=config.head_dim, use_attn_scale=True,
        n_key_value_heads=config.num_key_value_heads, gated_mlp=True, final_rms=True,
        original_architecture=type(config).__name__.replace("TextConfig", "Config").replace(
            "Config", "ForCausalLM"
        ),
        init_weights=False, device="cpu",
    )
    if version == 1:
        fields["rotary_base"] = _rope_theta(config)
    else:
        fields.update(
            window_size=config.sliding_window, use_local_attn=True,
            attn_types=[
                "local" if t == "sliding_attention" else "global" for t in config.layer_types
            ],
            use_normalization_before_and_after=True,
        )
        if config.attn_logit_softcapping is not None:
            fields["attn_scores_soft_cap"] = config.attn_logit_softcapping
        if config.final_logit_softcapping is not None:
            fields["output_logits_soft_cap"] = config.final_logit_softcapping
    if version == 2:
        fields["rotary_base"] = _rope_theta(config)
    if version == 3:
        fields.update(
            rotary_base=_rope_theta(config, "full_attention"),
            rotary_base_local=_rope_theta(config, "sliding_attention"),
            use_qk_norm=True,
        )
    return HookedTransformerConfig(**fields)


def hooked_transformer(folder: Path, hf_model: Any) -> Any:
    """The HookedTransformer of the model in `folder`, with `hf_model`'s weights converted by
    TransformerLens and left unprocessed."""
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import (
        get_pretrained_model_config,
        get_pretrained_state_dict,
    )

    if hf_model.config.model_type.startswith("gemma"):
        cfg = _gemma_tl_config(hf_model.config)
    else:
        cfg = get_pretrained_model_config(str(folder), fold_ln=False, device="cpu")
    with warnings.catch_warnings():
        # transformer-lens 3 flags HookedTransformer as deprecated; it is the reference here.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        model = HookedTransformer(cfg, move_to_device=False)
    state_dict = get_pretrained_state_dict(str(folder), cfg, hf_model=hf_model)
    model.load_and_process_state_dict(
        state_dict, fold_ln=False, center_writing_weights=False, center_unembed=False,
        fold_value_biases=False, refactor_factored_attn_matrices=False,
    )
    return model.eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    # 12 positions: longer than the Gemma 2/3 sliding window (8), so local layers differ.
    return torch.randint(5, VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(1))


_PAIRS: dict[str, tuple[HFBackend, Any]] = {}


def _pair(family_folder: Callable[[str], Path], family: str) -> tuple[HFBackend, Any]:
    """The family's model as an HFBackend and as a HookedTransformer (built once)."""
    if family not in _PAIRS:
        folder = family_folder(family)
        backend = load_model(folder)
        assert isinstance(backend, HFBackend)
        _PAIRS[family] = backend, hooked_transformer(folder, backend.model)
    return _PAIRS[family]


def _aliases(backend: HFBackend) -> list[str]:
    return [n for n in backend.hook_names() if n.startswith(("blocks.", "hook_", "ln_final."))]


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_aliases_match_transformer_lens(family_folder, tokens, family: str) -> None:
    backend, tl = _pair(family_folder, family)
    aliases = _aliases(backend)
    assert set(aliases) == EXPECTED_ALIASES[family]
    assert set(aliases) <= set(tl.hook_dict)
    with torch.no_grad():
        logits, cache = tl.run_with_cache(tokens)
    torch.testing.assert_close(backend.logits(tokens), logits, atol=ATOL, rtol=RTOL)
    acts = backend.activations(tokens, aliases)
    for name in aliases:
        assert acts[name].shape == cache[name].shape, name
        torch.testing.assert_close(acts[name], cache[name], atol=ATOL, rtol=RTOL, msg=name)


def _edit(act: torch.Tensor) -> torch.Tensor:
    """Zero head 1 of a per-head activation; add a fixed random direction to any other (a
    scale or a constant shift would vanish in the next LayerNorm)."""
    if act.ndim == 4:  # [batch, pos, n_heads, d_head]
        out = act.clone()
        out[:, :, 1] = 0
        return out
    generator = torch.Generator().manual_seed(act.shape[-1])
    return act + torch.randn(act.shape[-1], generator=generator)


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_alias_replacements_match_transformer_lens(family_folder, tokens, family: str) -> None:
    backend, tl = _pair(family_folder, family)
    with torch.no_grad():
        clean = tl(tokens)
        for name in _aliases(backend):
            if name.startswith("blocks.0.") or name == "blocks.1.hook_resid_pre":
                continue  # layer 1's hooks cover the same code paths
            expected = tl.run_with_hooks(tokens, fwd_hooks=[(name, lambda a, hook: _edit(a))])
            got = backend.logits(tokens, {name: _edit})
            torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL, msg=name)
            assert not torch.allclose(got, clean, atol=1e-4), f"replacing {name} changed nothing"


@pytest.mark.parametrize("family", ["gptj", "gpt_neox"])
def test_parallel_blocks_have_no_resid_mid(family_folder, tokens, family: str) -> None:
    backend = load_model(family_folder(family))
    assert "blocks.0.hook_resid_mid" not in backend.hook_names()
    with pytest.raises(ValueError, match="attention and MLP read the same input in parallel"):
        backend.activations(tokens, ["blocks.0.hook_resid_mid"])
