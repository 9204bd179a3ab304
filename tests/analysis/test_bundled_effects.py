"""Edits, steering and attribution on the bundled model (a real trained GPT-2): each effect
has the expected sign and size. Expected values come from the model's own final layer norm
and unembedding, or from finite differences, never from the code under test."""

from __future__ import annotations

import pytest
import torch
from analysis_helpers import make_sae

from saekit.analysis import (
    SplicedModel,
    ablate_latents,
    attribute,
    logit_diff,
    scale_latents,
    steering_hooks,
)
from saekit.assets.corpus import heldout_text
from saekit.models import load_model

LAST = "blocks.3.hook_resid_post"  # the bundled model has 4 blocks; then ln_f and lm_head
MID = "blocks.2.hook_resid_pre"


@pytest.fixture(scope="module")
def bundled():
    return load_model("bundled")


@pytest.fixture(scope="module")
def text_tokens(bundled) -> torch.Tensor:
    ids = bundled.tokenizer(heldout_text(400))["input_ids"][:24]
    return torch.tensor([[bundled.tokenizer.bos_token_id, *ids]])  # [1, 25]


def head(backend):
    model = backend.model
    return lambda resid: model.lm_head(model.transformer.ln_f(resid))


def test_ablation_moves_logits_by_the_decoder_direction(bundled, text_tokens) -> None:
    sae = make_sae(LAST, d_in=256, d_sae=512)
    model = SplicedModel(bundled, [sae], use_error_term=True)
    clean, cache = model.run_with_cache(text_tokens)
    torch.testing.assert_close(clean, bundled.logits(text_tokens))  # error term: unchanged
    acts = cache[f"{LAST}.hook_sae_acts_post"]
    latent = int(acts[0, 10].argmax())
    f = acts[0, 10, latent]
    assert f > 0
    edited = model.run_with_hooks(
        text_tokens, {f"{LAST}.hook_sae_acts_post": ablate_latents(latent, [10])}
    ).detach()
    resid = cache[LAST].clone()
    resid[0, 10] -= f * sae.W_dec[latent].detach()
    torch.testing.assert_close(edited, head(bundled)(resid), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(edited[:, :10], clean[:, :10])


def test_steering_has_the_right_sign_and_size(bundled, text_tokens) -> None:
    sae = make_sae(LAST, d_in=256, d_sae=512, seed=3)
    latent = 5
    direction = sae.W_dec[latent].detach()
    resid = bundled.activations(text_tokens, [LAST])[LAST]
    jvp = torch.func.jvp(head(bundled), (resid[0, 12],), (direction,))[1]
    promoted = int(jvp.argmax())
    model = SplicedModel(bundled)
    base = bundled.logits(text_tokens)[0, 12, promoted]
    small = 0.05
    up = model.run_with_hooks(text_tokens, steering_hooks(sae, {latent: small}))[0, 12, promoted]
    down = model.run_with_hooks(text_tokens, steering_hooks(sae, {latent: -small}))
    assert up > base > down[0, 12, promoted]
    torch.testing.assert_close(up - base, small * jvp[promoted], rtol=0.05, atol=1e-4)


def test_attribution_matches_finite_differences(bundled, text_tokens) -> None:
    sae = make_sae(MID, d_in=256, d_sae=512, seed=5)
    model = SplicedModel(bundled, [sae], use_error_term=True)
    the, a = bundled.tokenizer(" the")["input_ids"][0], bundled.tokenizer(" a")["input_ids"][0]
    metric = logit_diff(token=the, other=a, position=-1)
    result = attribute(model, text_tokens, metric)
    attr = result.saes[MID].attribution[0]  # [pos, d_sae]
    p, i = torch.unravel_index(attr.abs().argmax(), attr.shape)
    hook = f"{MID}.hook_sae_acts_post"

    def run(factor: float) -> float:
        mask = torch.zeros(1, text_tokens.shape[1], dtype=torch.bool)
        mask[0, int(p)] = True
        edit = scale_latents(int(i), factor, positions=mask)
        with torch.no_grad():
            return float(metric(model.run_with_hooks(text_tokens, {hook: edit})))

    eps = 1e-2
    finite = (run(1 + eps) - run(1 - eps)) / (2 * eps)
    assert finite == pytest.approx(float(attr[p, i]), rel=0.02, abs=1e-5)
    assert (run(0.0) - result.target) * float(attr[p, i]) < 0
