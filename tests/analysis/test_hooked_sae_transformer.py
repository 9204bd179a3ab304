"""HookedSAETransformer (SAELens's name for SplicedModel) against the model hooked by hand.

Expected values come from the model's own hook machinery (TransformerLens's run_with_hooks,
a torch forward pre-hook on the Hugging Face block) with the SAE applied by hand through
`sae.encode` / `sae.decode`, never from the splicing code under test."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from analysis_helpers import make_sae
from torch import Tensor

from saekit import HookedSAETransformer, SplicedModel

HOOK = "blocks.2.hook_resid_pre"  # the input of block 2 of the bundled 4-block GPT-2
TEXT = "Shall I compare thee to a summer's day?"


@pytest.fixture(scope="module", params=["hf", "transformer_lens"])
def model(request) -> HookedSAETransformer:
    return HookedSAETransformer.from_pretrained("bundled", backend=request.param)


@pytest.fixture(scope="module")
def sae():
    return make_sae(HOOK, d_in=256, d_sae=512)


def by_hand(model: SplicedModel, tokens: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Logits with `fn` applied to the input of block 2, hooked with the model's own tools."""
    module = model.backend.model
    if hasattr(module, "run_with_hooks"):  # TransformerLens
        return module.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda act, hook: fn(act))])
    handle = module.transformer.h[2].register_forward_pre_hook(
        lambda _m, args: (fn(args[0]), *args[1:])
    )
    try:
        return module(tokens).logits
    finally:
        handle.remove()


def test_run_with_saes_equals_the_sae_spliced_by_hand(model, sae) -> None:
    tokens = model.to_tokens(TEXT)
    with torch.no_grad():
        logits = model.run_with_saes(tokens, saes=[sae])
        expected = by_hand(model, tokens, lambda act: sae.decode(sae.encode(act)))
        clean = by_hand(model, tokens, lambda act: act)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    assert (logits - clean).abs().max() > 1e-2  # the SAE changed the output
    assert not model.acts_to_saes  # attached for that call only


def test_cache_with_saes_holds_what_the_sae_computes_by_hand(model, sae) -> None:
    tokens = model.to_tokens(TEXT)
    seen: dict[str, Tensor] = {}

    def record(act: Tensor) -> Tensor:
        seen["x"] = act.detach().clone()
        return sae.decode(sae.encode(act))

    with torch.no_grad():
        logits, cache = model.run_with_cache_with_saes(tokens, saes=[sae])
        expected_logits = by_hand(model, tokens, record)
        x = seen["x"]
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc  # a standard SAE, by hand
        acts = sae.encode(x)
        recons = sae.decode(acts)
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cache[HOOK], x)
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_input"], x)
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_acts_pre"], pre, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_acts_post"], acts)
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_recons"], recons)
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_output"], recons)
    assert f"{HOOK}.hook_sae_error" not in cache  # only with the error term
    assert not model.acts_to_saes
    with pytest.raises(KeyError, match="names_filter"):
        cache["blocks.0.hook_resid_post"]


def test_error_term_keeps_the_original_logits_and_caches_the_error(model, sae) -> None:
    tokens = model.to_tokens(TEXT)
    with torch.no_grad():
        clean = by_hand(model, tokens, lambda act: act)
        logits = model.run_with_saes(tokens, saes=[sae], use_error_term=True)
        _, cache = model.run_with_cache_with_saes(tokens, saes=[sae], use_error_term=True)
    torch.testing.assert_close(logits, clean, atol=1e-5, rtol=1e-5)
    x = cache[HOOK]
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_error"], x - sae(x))
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_output"], x)


def test_add_sae_then_reset_saes_restores_the_original_logits(model, sae) -> None:
    tokens = model.to_tokens(TEXT)
    with torch.no_grad():
        clean = model(tokens)
        assert model.add_sae(sae) == HOOK
        assert model.acts_to_saes == {HOOK: sae}
        spliced = model(tokens)
        other = make_sae(HOOK, d_in=256, d_sae=512, seed=1)
        model.add_sae(other)  # SAELens's add_sae replaces the SAE at the same hook
        assert model.acts_to_saes == {HOOK: other}
        model.reset_saes()
        assert not model.acts_to_saes
        again = model(tokens)
        model.add_sae(sae)
        model.reset_saes(HOOK)
    assert not torch.allclose(spliced, clean)
    assert torch.equal(again, clean)
    assert not model.acts_to_saes


def test_saes_context_manager_restores_on_exit_and_on_exception(model, sae) -> None:
    tokens = model.to_tokens(TEXT)
    other = make_sae(HOOK, d_in=256, d_sae=512, seed=2)
    with torch.no_grad():
        clean = model(tokens)
        with model.saes(saes=[sae]) as inside:
            assert inside is model and model.acts_to_saes == {HOOK: sae}
            spliced = model(tokens)
        assert not model.acts_to_saes
        with pytest.raises(RuntimeError, match="boom"), model.saes(saes=[sae]):
            raise RuntimeError("boom")
        assert not model.acts_to_saes
        model.add_sae(sae)
        with model.saes(saes=other):  # replaced for the block, then put back
            assert model.acts_to_saes == {HOOK: other}
        assert model.acts_to_saes == {HOOK: sae}
        torch.testing.assert_close(model(tokens), spliced)
        model.reset_saes()
        with model.saes(saes=[other], reset_saes_end=False):
            pass
        assert model.acts_to_saes == {HOOK: other}
        model.reset_saes()
        assert torch.equal(model(tokens), clean)


def test_to_tokens_and_to_string_round_trip(model, sae) -> None:
    tokenizer = model.tokenizer
    tokens = model.to_tokens(TEXT)
    assert tokens.shape[0] == 1 and int(tokens[0, 0]) == tokenizer.bos_token_id
    assert tokens[0, 1:].tolist() == tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert model.to_string(tokens[0, 1:]) == TEXT
    assert model.to_string(tokens)[0].endswith(TEXT)
    assert model.to_tokens(TEXT, prepend_bos=False)[0].tolist() == tokens[0, 1:].tolist()
    batch = model.to_tokens([TEXT, "Thou art"])
    assert batch.shape == (2, tokens.shape[1])
    assert batch[1, 3:].eq(tokenizer.pad_token_id or tokenizer.eos_token_id).all()
    pieces = model.to_str_tokens("Thou art")
    assert pieces[0] == "<|endoftext|>" and "".join(pieces[1:]) == "Thou art"
    # With an SAE attached whose training started windows without BOS, text follows it.
    no_bos = make_sae(HOOK, d_in=256, d_sae=512)
    no_bos.cfg.metadata.prepend_bos = False
    with model.saes(no_bos):
        assert model.to_tokens(TEXT)[0].tolist() == tokens[0, 1:].tolist()
    # Text goes through the same tokenization as tokens do.
    with torch.no_grad():
        torch.testing.assert_close(model.run_with_saes(TEXT, saes=[sae]),
                                   model.run_with_saes(tokens, saes=[sae]))


def test_generate_greedy_equals_an_argmax_loop_by_hand(model, sae) -> None:
    tokens = model.to_tokens("Shall I compare")
    splice = lambda act: sae.decode(sae.encode(act))  # noqa: E731
    with torch.no_grad():
        expected = tokens.clone()
        for _ in range(6):
            nxt = by_hand(model, expected, splice)[:, -1].argmax(-1)
            expected = torch.cat([expected, nxt[:, None]], dim=1)
        with model.saes(saes=[sae]):
            out = model.generate(tokens, max_new_tokens=6, do_sample=False, stop_at_eos=False)
            text = model.generate("Shall I compare", max_new_tokens=6, do_sample=False,
                                  stop_at_eos=False)
        sampled = [model.generate(tokens, max_new_tokens=4, temperature=0.8, top_k=20, seed=3,
                                  stop_at_eos=False) for _ in range(2)]
    assert torch.equal(out.cpu(), expected.cpu())
    assert text == model.to_string(expected[0, 1:])
    assert torch.equal(sampled[0], sampled[1])  # seeded sampling repeats
    assert sampled[0].shape == (1, tokens.shape[1] + 4)


def test_hook_functions_written_for_transformer_lens_run(model, sae) -> None:
    tokens = model.to_tokens(TEXT)
    names: list[tuple[str, int]] = []

    def zero_latents(acts: Tensor, hook) -> Tensor:
        names.append((hook.name, hook.layer()))
        return torch.zeros_like(acts)

    point = f"{HOOK}.hook_sae_acts_post"
    with torch.no_grad():
        logits = model.run_with_hooks_with_saes(
            tokens, saes=[sae], fwd_hooks=[(point, zero_latents)]
        )
        expected = by_hand(model, tokens, lambda act: sae.b_dec.expand_as(act))
        losses = model.run_with_saes(tokens, saes=[sae], return_type="loss",
                                     loss_per_token=True)
    assert names == [(point, 2)]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    spliced = by_hand(model, tokens, lambda act: sae.decode(sae.encode(act)))
    manual = torch.nn.functional.cross_entropy(
        spliced[0, :-1], tokens[0, 1:].to(spliced.device), reduction="none"
    )
    torch.testing.assert_close(losses[0], manual, atol=1e-4, rtol=1e-4)


def test_a_llama_family_model_on_the_hugging_face_backend() -> None:
    from models.families import D_MODEL, build_model, build_tokenizer

    hf, tokenizer = build_model("llama"), build_tokenizer("llama")
    model = HookedSAETransformer(hf, tokenizer=tokenizer)
    hook = "blocks.1.hook_resid_pre"
    sae = make_sae(hook, d_in=D_MODEL, d_sae=128, architecture="topk", k=8)
    tokens = model.to_tokens("to be or not to be")
    # The Llama-style tokenizer adds BOS itself: one BOS, not two.
    assert tokens[0].tolist() == tokenizer("to be or not to be")["input_ids"]
    assert int(tokens[0, 0]) == tokenizer.bos_token_id and int(tokens[0, 1]) != int(tokens[0, 0])
    seen: dict[str, Tensor] = {}

    def splice(act: Tensor) -> Tensor:
        seen["x"] = act.detach().clone()
        return sae.decode(sae.encode(act))

    handle = hf.model.layers[1].register_forward_pre_hook(
        lambda _m, args: (splice(args[0]), *args[1:])
    )
    with torch.no_grad():
        try:
            expected = hf(tokens).logits
        finally:
            handle.remove()
        logits, cache = model.run_with_cache_with_saes(tokens, saes=sae)
        clean = model.run_with_saes(tokens, saes=[sae], use_error_term=True)
        greedy = model.generate(tokens, max_new_tokens=4, do_sample=False, stop_at_eos=False)
        loop = tokens.clone()
        for _ in range(4):
            loop = torch.cat([loop, hf(loop).logits[:, -1].argmax(-1)[:, None]], dim=1)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cache[f"{hook}.hook_sae_acts_post"], sae.encode(seen["x"]))
    torch.testing.assert_close(clean, hf(tokens).logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(greedy, loop)


def test_hooks_context_and_add_hook_apply_to_every_forward_pass(model, sae) -> None:
    tokens = model.to_tokens(TEXT)
    shift = torch.zeros(256)
    shift[0] = 5.0
    add = lambda act, hook: act + shift.to(act)  # noqa: E731
    with torch.no_grad():
        clean = model(tokens)
        expected = by_hand(model, tokens, lambda act: act + shift.to(act))
        with model.hooks(fwd_hooks=[(HOOK, add)]):
            inside = model(tokens)
            steered = model.generate(tokens, max_new_tokens=2, do_sample=False,
                                     stop_at_eos=False)
        model.add_hook(lambda name: name == HOOK, add)  # a name filter, as TransformerLens
        lasting = model(tokens)
        model.reset_hooks()
        after = model(tokens)
    torch.testing.assert_close(inside, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lasting, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(after, clean)
    assert int(steered[0, -2]) == int(expected[0, -1].argmax())
