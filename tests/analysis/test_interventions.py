"""Latent edits, steering and attribution: each effect has the expected sign and size.

Expected values come from the model's own modules (final layer norm and unembedding applied
by hand) or from finite differences, never from the code under test.
"""

from __future__ import annotations

import pytest
import torch
from analysis_helpers import make_sae

from saekit.analysis import (
    SplicedModel,
    ablate_latents,
    attribute,
    clamp_latents,
    generate,
    logit_diff,
    scale_latents,
    steering_hooks,
)

LAST = "blocks.1.hook_resid_post"  # output of the last block: next come ln_f and unembedding


def head(backend):
    """The model's own map from the last block's output to logits."""
    model = backend.model
    if hasattr(model, "unembed"):  # HookedTransformer
        return lambda resid: model.unembed(model.ln_final(resid))
    return lambda resid: model.lm_head(model.transformer.ln_f(resid))


def test_latent_edits_on_values() -> None:
    acts = torch.arange(24.0).reshape(1, 3, 8)
    out = ablate_latents([1, 2], positions=[0, -1])(acts)
    assert out[0, 0, 1] == 0 and out[0, 2, 2] == 0 and out[0, 1, 1] == acts[0, 1, 1]
    assert torch.equal(out[..., 3:], acts[..., 3:])
    out = clamp_latents(5, 100.0, positions=slice(1, None))(acts)
    assert out[0, 0, 5] == 5 and (out[0, 1:, 5] == 100).all()
    out = scale_latents(0, -2.0)(acts)
    assert torch.equal(out[..., 0], -2 * acts[..., 0])
    with pytest.raises(ValueError, match="out of range"):
        ablate_latents(8)(acts)
    with pytest.raises(ValueError, match="out of range"):
        ablate_latents(0, positions=[3])(acts)
    with pytest.raises(ValueError, match="mode"):
        from saekit.analysis import LatentEdit

        LatentEdit((0,), "double")


@pytest.mark.parametrize("edit", ["ablate", "clamp"])
def test_edit_changes_logits_by_the_decoder_direction(backend, tokens, edit) -> None:
    sae = make_sae(LAST)
    model = SplicedModel(backend, [sae], use_error_term=True)
    _, cache = model.run_with_cache(tokens)
    acts = cache[f"{LAST}.hook_sae_acts_post"]
    latent = int(acts[:, 5].min(dim=0).values.argmax())  # fires at position 5 in both rows
    f = acts[:, 5, latent]
    assert (f > 0).all()
    fn = ablate_latents(latent, [5]) if edit == "ablate" else clamp_latents(latent, 3.0, [5])
    new_f = torch.zeros_like(f) if edit == "ablate" else torch.full_like(f, 3.0)
    logits = model.run_with_hooks(tokens, {f"{LAST}.hook_sae_acts_post": fn}).detach()
    resid = cache[LAST].clone()
    resid[:, 5] += (new_f - f)[:, None] * sae.W_dec[latent].detach()
    torch.testing.assert_close(logits, head(backend)(resid), atol=1e-5, rtol=1e-4)
    clean = backend.logits(tokens)
    # Only position 5 moves, and the push is along -W_dec (ablate) or +W_dec (clamp up).
    torch.testing.assert_close(logits[:, :5], clean[:, :5])
    torch.testing.assert_close(logits[:, 6:], clean[:, 6:])
    assert not torch.allclose(logits[:, 5], clean[:, 5])


def test_steering_adds_the_direction_with_the_right_sign_and_size(backend, tokens) -> None:
    sae = make_sae(LAST)
    latent, coeff = 7, 4.0
    direction = sae.W_dec[latent].detach()
    model = SplicedModel(backend)
    resid = backend.activations(tokens, [LAST])[LAST]
    for c in (coeff, -coeff):
        steered = model.run_with_hooks(tokens, steering_hooks(sae, {latent: c})).detach()
        torch.testing.assert_close(steered, head(backend)(resid + c * direction))
    # Sign: the token the direction promotes most, read through the model's own final layer
    # norm at this position, goes up with +c and down with -c.
    at = resid[0, 3]
    jvp = torch.func.jvp(head(backend), (at,), (direction,))[1]  # d logits / d c at c = 0
    promoted = int(jvp.argmax())
    small = 0.05
    up = model.run_with_hooks(tokens, steering_hooks(sae, {latent: small}))[0, 3, promoted]
    down = model.run_with_hooks(tokens, steering_hooks(sae, {latent: -small}))[0, 3, promoted]
    base = backend.logits(tokens)[0, 3, promoted]
    assert up > base > down
    torch.testing.assert_close(up - base, small * jvp[promoted], rtol=0.05, atol=1e-5)


def test_steering_only_at_chosen_positions(backend, tokens) -> None:
    sae = make_sae(LAST)
    model = SplicedModel(backend)
    steered = model.run_with_hooks(tokens, steering_hooks(sae, {3: 5.0}, positions=[2])).detach()
    clean = backend.logits(tokens)
    torch.testing.assert_close(steered[:, :2], clean[:, :2])
    torch.testing.assert_close(steered[:, 3:], clean[:, 3:])
    assert not torch.allclose(steered[:, 2], clean[:, 2])


def test_steered_generation_follows_the_steered_greedy_choice(backend) -> None:
    sae = make_sae(LAST)
    direction = 30.0 * sae.W_dec[11].detach()
    model = SplicedModel(backend)
    prompt = torch.tensor([[0, 17, 42, 99]])
    plain = generate(model, prompt, 6)
    steered = generate(model, prompt, 6, fwd_hooks=steering_hooks(sae, {11: 30.0}))
    # Independent greedy loop with the direction added by hand through the backend.
    tokens = prompt
    for _ in range(6):
        logits = backend.logits(tokens, {LAST: lambda a: a + direction})
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(steered.tokens, tokens)
    assert not torch.equal(steered.tokens, plain.tokens)
    assert isinstance(steered.text[0], str) and steered.text[0]


def test_generate_from_text_and_sampling(backend) -> None:
    model = SplicedModel(backend)
    a = generate(model, "Shall I compare", 4, temperature=1.0, seed=3)
    b = generate(model, "Shall I compare", 4, temperature=1.0, seed=3)
    assert torch.equal(a.tokens, b.tokens)
    assert a.tokens[0, 0] == backend.tokenizer.bos_token_id
    with pytest.raises(ValueError, match="temperature"):
        generate(model, "x", 2, temperature=-1)


def test_attribution_matches_finite_differences(backend, tokens) -> None:
    sae = make_sae("blocks.1.hook_resid_pre")
    model = SplicedModel(backend, [sae], use_error_term=True)
    metric = logit_diff(token=10, other=20, position=-1)
    result = attribute(model, tokens, metric)
    name = "blocks.1.hook_resid_pre"
    # With the error term the target is the model's own logit difference.
    torch.testing.assert_close(
        torch.tensor(result.target), metric(backend.logits(tokens)).detach()
    )
    attr = result.saes[name].attribution
    assert attr.shape == (2, 9, 64)
    assert (attr[result.saes[name].activations == 0] == 0).all()
    # d/d(alpha) metric(alpha * f) at alpha = 1 is f * grad: check it by central differences
    # on the largest attributions of either sign.
    eps = 1e-2
    hook = f"{name}.hook_sae_acts_post"
    flat = attr.flatten()
    for index in (int(flat.argmax()), int(flat.argmin())):
        b, p, i = torch.unravel_index(torch.tensor(index), attr.shape)

        def run(factor: float, b=int(b), p=int(p), i=int(i)) -> float:
            mask = torch.zeros(2, 9, dtype=torch.bool)
            mask[b, p] = True
            edit = scale_latents(i, factor, positions=mask)
            with torch.no_grad():
                return float(metric(model.run_with_hooks(tokens, {hook: edit})))

        finite = (run(1 + eps) - run(1 - eps)) / (2 * eps)
        assert finite == pytest.approx(float(attr[b, p, i]), rel=0.02, abs=1e-5)
        # Sign: removing a latent with positive attribution lowers the target, and the
        # reverse for negative attribution.
        assert (run(0.0) - result.target) * float(attr[b, p, i]) < 0


def test_attribution_needs_an_sae(backend, tokens) -> None:
    with pytest.raises(ValueError, match="attach"):
        attribute(SplicedModel(backend), tokens, logit_diff(1))
