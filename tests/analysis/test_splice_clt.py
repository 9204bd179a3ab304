"""A cross-layer transcoder spliced into a model as a whole: error terms leave the logits as
they are, without them the model is the replacement model, each layer's points are named like
a per-layer transcoder's, and detaching restores the model. On the tiny random models of
both backends and on the bundled model."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from analysis_helpers import D_MODEL

from saekit import SAE
from saekit.analysis import SplicedModel, ablate_latents
from saekit.analysis.replacement import replacement_logits
from saekit.models import load_model
from saekit.saes.clt import CrossLayerTranscoder, layer_hooks, record_hooks

POINTS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons",
          "hook_sae_output")


@pytest.fixture(autouse=True)
def _single_thread(one_thread: None) -> None:
    """Tiny matmuls run fastest on one thread."""


def make_clt(d_model: int, n_layers: int, skip: bool = False, seed: int = 0,
             hook_in: str = "ln2.hook_normalized") -> CrossLayerTranscoder:
    """A ReLU CLT over blocks 0..n_layers-1 whose latents fire often and whose writes are
    sizeable, so that replacing the MLPs changes the logits."""
    torch.manual_seed(seed)
    clt = SAE.create("clt", d_model, 48, n_layers=n_layers, activation_fn="relu",
                     skip_connection=skip)
    with torch.no_grad():
        clt.W_enc.copy_(torch.randn_like(clt.W_enc) / d_model**0.5)
        clt.b_enc.fill_(0.1)
        for w in clt.decoders():
            w.copy_(torch.randn_like(w) / 48**0.5)
        if skip:
            clt.W_skip.copy_(torch.randn_like(clt.W_skip) / d_model**0.5)
    record_hooks(clt, layer_hooks(range(n_layers), hook_in),
                 layer_hooks(range(n_layers), "hook_mlp_out"))
    return clt


@pytest.fixture(scope="module")
def bundled() -> Any:
    return load_model("bundled")


@pytest.fixture(params=["hf", "tl", "bundled"])
def world(request, hf_backend, tl_backend, tokens) -> tuple[Any, torch.Tensor, int, int]:
    """(backend, tokens, d_model, n_layers) for each model the tests run on."""
    if request.param == "bundled":
        backend = request.getfixturevalue("bundled")
        ids = torch.randint(10, 1000, (2, 9), generator=torch.Generator().manual_seed(1))
        return backend, ids, 256, 4
    backend = hf_backend if request.param == "hf" else tl_backend
    return backend, tokens, D_MODEL, 2


def capture(store: dict[str, torch.Tensor], name: str) -> Any:
    def fn(act: torch.Tensor) -> torch.Tensor:
        store[name] = act.detach()
        return act

    return fn


@pytest.mark.parametrize("skip", [False, True])
def test_without_error_terms_it_is_the_replacement_model(world, skip: bool) -> None:
    backend, tokens, d_model, n_layers = world
    clt = make_clt(d_model, n_layers, skip)
    model = SplicedModel(backend)
    assert model.attach(clt) == "clt"
    logits = model(tokens)
    torch.testing.assert_close(logits, replacement_logits(clt, backend, tokens))
    assert not torch.allclose(logits, backend.logits(tokens), atol=1e-3)
    model.detach(clt)
    assert not model.attached
    torch.testing.assert_close(model(tokens), backend.logits(tokens))


def test_with_error_terms_the_logits_are_the_models(world) -> None:
    backend, tokens, d_model, n_layers = world
    clt = make_clt(d_model, n_layers, skip=True)
    model = SplicedModel(backend)
    model.attach(clt, use_error_term=True)
    logits, cache = model.run_with_cache(tokens)
    hooks_in = layer_hooks(range(n_layers), "ln2.hook_normalized")
    hooks_out = layer_hooks(range(n_layers), "hook_mlp_out")
    # Exactly the model's logits, as the backend computes them with the same hooks touched
    # (the Hugging Face backend recomputes a LayerNorm's output it hands to a hook, which
    # moves the bundled model's logits by ~5e-6 even for a hook that changes nothing).
    clean: dict[str, torch.Tensor] = {}
    untouched = backend.logits(tokens, {h: capture(clean, h) for h in hooks_in + hooks_out})
    assert torch.equal(logits, untouched)
    torch.testing.assert_close(logits, backend.logits(tokens), rtol=1e-5, atol=1e-4)
    for layer, (h_in, h_out) in enumerate(zip(hooks_in, hooks_out, strict=True)):
        assert torch.equal(cache[f"{h_in}.hook_sae_output"], clean[h_out])
        # The error term is what the CLT's whole output (skip included) misses.
        latents = [clt.encode_layer(clean[hooks_in[i]], i) for i in range(layer + 1)]
        recon = clt.decode_layer(latents, layer) + clt.layer_skip(clean[h_in], layer)
        torch.testing.assert_close(cache[f"{h_in}.hook_sae_recons"], recon)
        torch.testing.assert_close(cache[f"{h_in}.hook_sae_error"], clean[h_out] - recon,
                                   rtol=1e-5, atol=1e-5)


def test_each_layer_is_named_like_a_per_layer_transcoder(tl_backend, tokens) -> None:
    clt = make_clt(D_MODEL, 2)
    model = SplicedModel(tl_backend, [clt])
    hooks_in = layer_hooks(range(2), "ln2.hook_normalized")
    assert list(model.attached) == hooks_in
    assert all(f"{h}.{p}" in model.hook_names() for h in hooks_in for p in POINTS)
    _, cache = model.run_with_cache(tokens)
    assert {f"{h}.{p}" for h in hooks_in for p in POINTS} <= set(cache)
    # Layer 0 reads the clean model's input; layer 1 reads what the replaced layer 0 made.
    clean = tl_backend.activations(tokens, hooks_in)
    torch.testing.assert_close(cache[f"{hooks_in[0]}.hook_sae_input"], clean[hooks_in[0]])
    for layer, hook in enumerate(hooks_in):
        x = cache[f"{hook}.hook_sae_input"]
        torch.testing.assert_close(cache[hook], x)  # the model hook, cached as for an SAE
        torch.testing.assert_close(cache[f"{hook}.hook_sae_acts_post"],
                                   clt.encode_layer(x, layer))
        torch.testing.assert_close(cache[f"{hook}.hook_sae_acts_pre"],
                                   x @ clt.W_enc[layer] + clt.b_enc[layer])


def test_an_edit_at_layer_0_writes_through_its_decoders(tl_backend, tokens) -> None:
    clt = make_clt(D_MODEL, 2)
    model = SplicedModel(tl_backend, [clt], use_error_term=True)
    hook0 = "blocks.0.ln2.hook_normalized"
    _, clean = model.run_with_cache(tokens)
    acts = clean[f"{hook0}.hook_sae_acts_post"]
    latent = int((acts[0, 4] > 0).nonzero()[0])
    edit = {f"{hook0}.hook_sae_acts_post": ablate_latents(latent, positions=[4])}
    _, cache = model.run_with_cache(tokens, fwd_hooks=edit)
    # Layer 0's output moves by exactly -f * W_dec_0[latent, 0], at position 4 only.
    delta = cache[f"{hook0}.hook_sae_output"] - clean["blocks.0.hook_mlp_out"]
    expected = torch.zeros_like(delta)
    expected[:, 4] = -acts[:, 4, latent, None] * clt.W_dec_0[latent, 0].detach()
    torch.testing.assert_close(delta, expected, atol=1e-6, rtol=1e-5)


def test_attaching_detaching_and_replacing(tl_backend, tokens) -> None:
    clt = make_clt(D_MODEL, 2)
    model = SplicedModel(tl_backend)
    plain = tl_backend.logits(tokens)
    with model.saes(clt):
        assert list(model.attached) == layer_hooks(range(2), "ln2.hook_normalized")
        torch.testing.assert_close(model(tokens), replacement_logits(clt, tl_backend, tokens))
    assert not model.attached
    torch.testing.assert_close(model(tokens), plain)
    # Detaching one layer's name detaches the whole CLT; so does its own name.
    model.attach(clt, name="mine")
    model.detach("blocks.1.ln2.hook_normalized")
    assert not model.attached
    model.attach(clt, name="mine")
    with pytest.raises(ValueError, match="already attached"):
        model.attach(clt, name="other")
    model.detach("mine")
    # add_sae replaces a per-layer SAE at a layer's hook, and the CLT leaves whole later.
    tc = SAE.create("transcoder", D_MODEL, 16, d_out=D_MODEL)
    tc.cfg.metadata.hook_name = "blocks.0.ln2.hook_normalized"
    tc.cfg.metadata.hook_name_out = "blocks.0.hook_mlp_out"
    model.attach(tc)
    model.add_sae(clt)
    assert [a.sae for a in model.attached.values()] == [clt, clt]
    torch.testing.assert_close(model(tokens), replacement_logits(clt, tl_backend, tokens))
    model.reset_saes()
    torch.testing.assert_close(model(tokens), plain)
    with pytest.raises(ValueError, match="record_hooks"):
        model.attach(clt, hook="blocks.0.hook_resid_pre")


def test_unknown_hooks_are_refused_before_any_pass(tl_backend) -> None:
    clt = make_clt(D_MODEL, 3)  # the tiny model has two blocks
    with pytest.raises(ValueError, match="blocks.2.ln2.hook_normalized"):
        SplicedModel(tl_backend).attach(clt)
