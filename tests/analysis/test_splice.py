"""SplicedModel against the backends' own forward passes, with SAEs computed by hand."""

from __future__ import annotations

import pytest
import torch
from analysis_helpers import D_MODEL, make_sae

from saekit.analysis import SAE_POINTS, SplicedModel, ablate_latents

HOOK = "blocks.1.hook_resid_pre"


def test_cache_holds_every_point_and_matches_the_sae(backend, tokens) -> None:
    sae = make_sae(HOOK)
    model = SplicedModel(backend, [sae])
    logits, cache = model.run_with_cache(tokens)
    x = backend.activations(tokens, [HOOK])[HOOK]
    assert {f"{HOOK}.{p}" for p in SAE_POINTS if p != "hook_sae_error"} <= set(cache)
    assert f"{HOOK}.hook_sae_error" not in cache  # only with the error term
    torch.testing.assert_close(cache[HOOK], x)
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_input"], x)
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_acts_post"], sae.encode(x))
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_recons"], sae(x))
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_output"], sae(x))
    # The model run with the reconstruction put in by the backend itself.
    expected = backend.logits(tokens, {HOOK: lambda act: sae(act).detach()})
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits, backend.logits(tokens))  # the splice changed something


def test_error_term_leaves_the_output_exactly_unchanged(backend, tokens) -> None:
    sae = make_sae(HOOK)
    model = SplicedModel(backend)
    clean = backend.logits(tokens)
    with model.saes(sae, use_error_term=True):
        logits, cache = model.run_with_cache(tokens)
    assert torch.equal(logits, clean)
    x = cache[HOOK]
    assert torch.equal(cache[f"{HOOK}.hook_sae_output"], x)
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_error"], x - sae(x))


def test_error_term_passes_latent_edits_through_exactly(backend, tokens) -> None:
    sae = make_sae(HOOK)
    model = SplicedModel(backend, [sae], use_error_term=True)
    _, clean = model.run_with_cache(tokens)
    acts = clean[f"{HOOK}.hook_sae_acts_post"]
    latent = int((acts[0, 4] > 0).nonzero()[0])
    edit = {f"{HOOK}.hook_sae_acts_post": ablate_latents(latent, positions=[4])}
    logits, cache = model.run_with_cache(tokens, fwd_hooks=edit)
    # Size: the written activation moves by exactly -f * W_dec[latent], at position 4 only.
    delta = cache[f"{HOOK}.hook_sae_output"] - clean[HOOK]
    expected = torch.zeros_like(delta)
    expected[:, 4] = -acts[:, 4, latent, None] * sae.W_dec[latent].detach()
    torch.testing.assert_close(delta, expected, atol=1e-6, rtol=1e-5)
    # The downstream effect is exactly that of adding the same delta to the clean model.
    manual = backend.logits(tokens, {HOOK: lambda act: act + expected})
    torch.testing.assert_close(logits, manual, atol=1e-5, rtol=1e-5)
    # Causal model: positions before the edit are untouched.
    torch.testing.assert_close(logits[:, :4], backend.logits(tokens)[:, :4])


def test_attach_detach_and_context_manager(backend, tokens) -> None:
    sae = make_sae(HOOK)
    model = SplicedModel(backend)
    clean = model(tokens)
    name = model.attach(sae)
    assert name == HOOK and list(model.attached) == [HOOK]
    spliced = model(tokens)
    assert not torch.allclose(spliced, clean)
    with pytest.raises(ValueError, match="already attached"):
        model.attach(sae)
    model.detach(sae)
    assert torch.equal(model(tokens), clean)
    with model.saes(sae) as inner:
        torch.testing.assert_close(inner(tokens), spliced)
    assert not model.attached
    with pytest.raises(ValueError, match="no SAE attached"):
        model.detach("blocks.0.hook_resid_pre")


def test_bad_hook_names_list_the_closest(backend) -> None:
    model = SplicedModel(backend)
    with pytest.raises(ValueError, match="blocks.1.hook_resid_pre"):
        model.attach(make_sae("blocks.1.hook_resid_pr"))
    with pytest.raises(ValueError, match="hook_sae_acts_post"):
        model.attach(make_sae(HOOK))
        model.run_with_hooks(
            torch.zeros(1, 3, dtype=torch.long),
            {f"{HOOK}.hook_sae_acts_psot": lambda a: a},
        )


def test_two_saes_in_one_pass(backend, tokens) -> None:
    first, second = make_sae("blocks.0.hook_resid_pre", seed=1), make_sae(HOOK, seed=2)
    model = SplicedModel(backend, [first, second])
    expected = backend.logits(
        tokens,
        {
            "blocks.0.hook_resid_pre": lambda a: first(a).detach(),
            HOOK: lambda a: second(a).detach(),
        },
    )
    torch.testing.assert_close(model(tokens), expected)


def test_transcoder_reads_one_hook_and_writes_another(tl_backend, tokens) -> None:
    hook_in, hook_out = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
    tc = make_sae(hook_in, architecture="skip_transcoder", d_out=D_MODEL)
    tc.cfg.metadata.hook_name_out = hook_out
    model = SplicedModel(tl_backend, [tc])
    logits, cache = model.run_with_cache(tokens)
    # The input hook comes before the output hook, so its clean value is what is read.
    x = tl_backend.activations(tokens, [hook_in])[hook_in]
    torch.testing.assert_close(cache[f"{hook_in}.hook_sae_input"], x)
    torch.testing.assert_close(cache[f"{hook_in}.hook_sae_output"], tc(x))
    expected = tl_backend.logits(tokens, {hook_out: lambda a: tc(x).detach()})
    torch.testing.assert_close(logits, expected)


def test_per_head_sae_changes_its_head_only(tl_backend, tokens) -> None:
    hook = "blocks.0.attn.hook_z"
    sae = make_sae(hook, d_in=D_MODEL // 2)
    sae.cfg.metadata.hook_head_index = 1
    model = SplicedModel(tl_backend, [sae])
    _, cache = model.run_with_cache(tokens)
    z = cache[hook]
    out = cache[f"{hook}.hook_sae_output"]
    torch.testing.assert_close(out, sae(z[:, :, 1]))
    expected = tl_backend.logits(
        tokens, {hook: lambda a: torch.stack([a[:, :, 0], sae(a[:, :, 1]).detach()], dim=2)}
    )
    torch.testing.assert_close(model(tokens), expected)
