"""Model backends against the models' own forward passes (random-weight tiny models)."""

from __future__ import annotations

import sys

import pytest
import torch

from saekit.models import (
    HFBackend,
    ModelBackend,
    TransformerLensBackend,
    load_model,
    replace_head,
    select_head,
)
from saekit.models.tiny import tiny_gpt2, tiny_hooked_transformer, tiny_llama, tiny_tokenizer

VOCAB = 300


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2(VOCAB)


@pytest.fixture(scope="module")
def hooked():
    return tiny_hooked_transformer(VOCAB)


class _CallCounter:
    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *_args: object) -> None:
        self.calls += 1


def test_hf_backend_is_a_model_backend(gpt2) -> None:
    assert isinstance(load_model(gpt2), ModelBackend)
    assert isinstance(load_model(gpt2), HFBackend)


def test_hf_activations_match_hidden_states(gpt2, tokens) -> None:
    backend = load_model(gpt2)
    hidden = gpt2(tokens, output_hidden_states=True).hidden_states  # embeddings, block outputs
    acts = backend.activations(
        tokens,
        ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "transformer.h.1.input",
         "blocks.1.hook_resid_pre"],
    )
    torch.testing.assert_close(acts["blocks.0.hook_resid_pre"], hidden[0])
    torch.testing.assert_close(acts["blocks.0.hook_resid_post"], hidden[1])
    torch.testing.assert_close(acts["transformer.h.1.input"], hidden[1])
    torch.testing.assert_close(acts["blocks.1.hook_resid_pre"], hidden[1])
    assert not any(a.requires_grad for a in acts.values())


def test_hf_mlp_output_matches_module_call(gpt2, tokens) -> None:
    backend = load_model(gpt2)
    hooks = ["transformer.h.0.ln_2.output", "transformer.h.0.mlp.output"]
    acts = backend.activations(tokens, hooks)
    with torch.no_grad():
        expected = gpt2.transformer.h[0].mlp(acts["transformer.h.0.ln_2.output"])
    torch.testing.assert_close(acts["transformer.h.0.mlp.output"], expected)


def test_hf_forward_stops_after_last_hook(gpt2, tokens) -> None:
    later = _CallCounter(gpt2.transformer.h[1])
    head = _CallCounter(gpt2.lm_head)
    try:
        load_model(gpt2).activations(tokens, ["blocks.0.hook_resid_post"])
        assert later.calls == 0 and head.calls == 0
        load_model(gpt2).logits(tokens)
        assert later.calls == 1 and head.calls == 1
    finally:
        later.handle.remove()
        head.handle.remove()


def test_hf_logits_and_replacements(gpt2, tokens) -> None:
    backend = load_model(gpt2)
    with torch.no_grad():
        clean = gpt2(tokens).logits
        torch.testing.assert_close(backend.logits(tokens), clean)
        torch.testing.assert_close(
            backend.logits(tokens, {"blocks.1.hook_resid_pre": lambda x: x}), clean
        )
        # Zeroing the last block's output leaves lm_head(ln_f(0)) at every position.
        zeroed = backend.logits(tokens, {"transformer.h.1.output": torch.zeros_like})
        expected = gpt2.lm_head(gpt2.transformer.ln_f(torch.zeros(32)))
        torch.testing.assert_close(zeroed, expected.expand_as(zeroed))
        # The same tensor seen as block 0's output (forward hook) and block 1's input
        # (pre-hook): doubling it either way gives the same logits.
        via_output = backend.logits(tokens, {"transformer.h.0.output": lambda x: 2 * x})
        via_input = backend.logits(tokens, {"transformer.h.1.input": lambda x: 2 * x})
        torch.testing.assert_close(via_output, via_input)
        assert not torch.allclose(via_output, clean)
    # Hooks are removed afterwards: a clean run is clean again.
    torch.testing.assert_close(backend.logits(tokens), clean)


def test_hf_replacement_must_keep_shape(gpt2, tokens) -> None:
    with pytest.raises(ValueError, match="must keep the shape"):
        load_model(gpt2).logits(tokens, {"transformer.h.0.output": lambda x: x[..., :3]})


def test_hf_unknown_hook_lists_closest_names(gpt2, tokens) -> None:
    with pytest.raises(ValueError, match="closest valid hook names: blocks.1.hook_resid_pre"):
        load_model(gpt2).activations(tokens, ["blocks.1.hook_resid_pr"])
    with pytest.raises(ValueError, match="transformer.h.1.output"):
        load_model(gpt2).logits(tokens, {"transformer.h.1.outptu": lambda x: x})


def test_llama_aliases_and_module_paths(tokens) -> None:
    model = tiny_llama(VOCAB)
    backend = load_model(model)
    hidden = model(tokens, output_hidden_states=True).hidden_states
    hooks = [
        "blocks.1.hook_resid_pre",
        "model.layers.1.post_attention_layernorm.output",
        "model.layers.1.mlp.input",
        "blocks.1.hook_resid_post",
    ]
    acts = backend.activations(tokens, hooks)
    torch.testing.assert_close(acts["blocks.1.hook_resid_pre"], hidden[1])
    # The MLP reads the post-attention norm's output.
    torch.testing.assert_close(acts[hooks[2]], acts[hooks[1]])
    # The last hidden state is the final norm of block 1's output.
    with torch.no_grad():
        torch.testing.assert_close(model.model.norm(acts["blocks.1.hook_resid_post"]), hidden[2])


def test_hf_dtype_option(tokens) -> None:
    backend = load_model(tiny_gpt2(VOCAB), dtype="bfloat16")
    assert backend.dtype == torch.bfloat16
    assert backend.activations(tokens, ["blocks.1.hook_resid_pre"])[
        "blocks.1.hook_resid_pre"
    ].dtype == torch.bfloat16


def test_load_model_from_local_folder(tmp_path, gpt2, tokens) -> None:
    gpt2.save_pretrained(tmp_path)
    tiny_tokenizer(VOCAB).save_pretrained(tmp_path)
    backend = load_model(tmp_path, dtype=torch.float16, device="cpu")
    assert isinstance(backend, HFBackend)
    assert backend.dtype == torch.float16
    assert backend.tokenizer is not None and backend.tokenizer.bos_token == "<|bos|>"
    assert backend.name == str(tmp_path)
    torch.testing.assert_close(
        backend.logits(tokens).float(), gpt2(tokens).logits.detach(), atol=0.05, rtol=0.05
    )


def test_load_model_rejects_bad_options(gpt2, hooked) -> None:
    with pytest.raises(ValueError, match="backend='keras' is not known"):
        load_model(gpt2, backend="keras")
    with pytest.raises(ValueError, match="not a TransformerLens model"):
        load_model(gpt2, backend="transformer_lens")
    with pytest.raises(ValueError, match="is a TransformerLens model"):
        load_model(hooked, backend="hf")
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        load_model(gpt2, dtype="int8")
    with pytest.raises(TypeError, match="cannot load a model from a int"):
        load_model(3)  # type: ignore[arg-type]


def test_load_model_passes_backends_through(gpt2) -> None:
    backend = load_model(gpt2)
    assert load_model(backend) is backend


def test_bundled_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # An installation without the bundled model: its module cannot be imported.
    monkeypatch.setitem(sys.modules, "saekit.models.bundled", None)
    with pytest.raises(ValueError, match="bundled model is not available"):
        load_model("bundled")


# TransformerLens


def test_tl_activations_match_run_with_cache(hooked, tokens) -> None:
    backend = load_model(hooked)
    assert isinstance(backend, TransformerLensBackend)
    hooks = ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_z", "blocks.0.hook_mlp_out"]
    acts = backend.activations(tokens, hooks)
    _, cache = hooked.run_with_cache(tokens)
    for hook in hooks:
        torch.testing.assert_close(acts[hook], cache[hook])
    assert acts["blocks.1.attn.hook_z"].shape == (2, 10, 2, 16)


def test_tl_forward_stops_after_last_hook(hooked, tokens) -> None:
    later = _CallCounter(hooked.blocks[1])
    try:
        load_model(hooked).activations(tokens, ["blocks.0.hook_resid_post"])
        assert later.calls == 0
    finally:
        later.handle.remove()


def test_tl_logits_with_replacements_match_run_with_hooks(hooked, tokens) -> None:
    backend = load_model(hooked)
    with torch.no_grad():
        torch.testing.assert_close(backend.logits(tokens), hooked(tokens))

        def zero_head_1(z: torch.Tensor, hook: object) -> torch.Tensor:
            z = z.clone()
            z[:, :, 1] = 0
            return z

        expected = hooked.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", zero_head_1)])
        got = backend.logits(
            tokens, {"blocks.0.attn.hook_z": replace_head(torch.zeros_like, 1)}
        )
        torch.testing.assert_close(got, expected)
        assert not torch.allclose(got, hooked(tokens))
    assert not any(hp.fwd_hooks for hp in hooked.hook_dict.values())


def test_select_head(hooked, tokens) -> None:
    z = load_model(hooked).activations(tokens, ["blocks.0.attn.hook_z"])["blocks.0.attn.hook_z"]
    torch.testing.assert_close(select_head(z, 1), z[:, :, 1])
    assert select_head(z, None) is z
    with pytest.raises(ValueError, match="out of range for 2 heads"):
        select_head(z, 2)
    with pytest.raises(ValueError, match="needs a per-head hook"):
        select_head(z[:, :, 0], 0)


def test_tl_unknown_hook_lists_closest_names(hooked, tokens) -> None:
    with pytest.raises(ValueError, match="blocks.0.hook_mlp_out"):
        load_model(hooked).activations(tokens, ["blocks.0.hook_mlp_output"])


def test_hf_aliases_agree_with_converted_hooked_transformer(gpt2, tokens) -> None:
    """The HF alias blocks.N.hook_resid_pre is the same tensor TransformerLens names so."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_heads=2, d_head=16, d_mlp=128, d_vocab=VOCAB, n_ctx=128,
        act_fn="gelu_new", normalization_type="LN",
    )
    converted = HookedTransformer(cfg, move_to_device=False)
    converted.load_state_dict(convert_gpt2_weights(gpt2, cfg), strict=False)
    hooks = ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]
    hf_acts = load_model(gpt2).activations(tokens, hooks)
    tl_acts = load_model(converted).activations(tokens, hooks)
    for hook in hooks:
        torch.testing.assert_close(hf_acts[hook], tl_acts[hook], atol=1e-5, rtol=1e-5)


def test_transformer_bridge(tmp_path, gpt2, tokens) -> None:
    from transformer_lens.model_bridge import TransformerBridge

    gpt2.save_pretrained(tmp_path)
    tiny_tokenizer(VOCAB).save_pretrained(tmp_path)
    bridge = TransformerBridge.boot_transformers(str(tmp_path))
    bridge.enable_compatibility_mode()
    backend = load_model(bridge)
    assert isinstance(backend, TransformerLensBackend)
    hook = "blocks.1.hook_resid_pre"
    _, cache = bridge.run_with_cache(tokens)
    torch.testing.assert_close(backend.activations(tokens, [hook])[hook], cache[hook])
    with torch.no_grad():
        clean = bridge(tokens)
        doubled = backend.logits(tokens, {hook: lambda x: 2 * x})
        expected = bridge.run_with_hooks(tokens, fwd_hooks=[(hook, lambda x, hook: 2 * x)])
    torch.testing.assert_close(backend.logits(tokens), clean)
    torch.testing.assert_close(doubled, expected)
    assert not torch.allclose(doubled, clean)
