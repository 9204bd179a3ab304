"""The evaluation pass on tiny random models, against independent computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sae_factory import random_sae

from saekit import SAE, SAEConfig, SAEMetadata, architecture_class, list_architectures
from saekit.evals.runner import evaluate_saes
from saekit.models.tiny import tiny_gpt2, tiny_hooked_transformer, tiny_tokenizer
from saekit.models.tl import TransformerLensBackend
from saekit.sites import SAESite, sae_site

D_MODEL = 32
VOCAB = 300
BOS = 0  # "<|bos|>" is the tiny tokenizer's first special token


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(VOCAB)


@pytest.fixture(scope="module")
def tl_model(tokenizer):
    return tiny_hooked_transformer(VOCAB, d_model=D_MODEL, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def backend(tl_model):
    return TransformerLensBackend(tl_model)


def token_batches(n_batches: int = 2, batch: int = 3, pos: int = 12, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        tokens = torch.randint(3, VOCAB, (batch, pos), generator=gen)
        tokens[:, 0] = BOS
        out.append(tokens)
    return out


def identity_sae(d: int, hook: str, **cfg) -> SAE:
    """A standard SAE that reconstructs exactly: latents (relu(x), relu(-x)), decoder (I; -I)."""
    meta = SAEMetadata(hook_name=hook, **cfg.pop("metadata", {}))
    sae = SAE.from_config(SAEConfig("standard", d_in=d, d_sae=2 * d, metadata=meta, **cfg))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def zero_sae(d: int, hook: str, **cfg) -> SAE:
    meta = SAEMetadata(hook_name=hook, **cfg.pop("metadata", {}))
    sae = SAE.from_config(SAEConfig("standard", d_in=d, d_sae=8, metadata=meta, **cfg))
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
    return sae


def reference_ce(tl_model, tokens, hook=None, fn=None) -> float:
    """Mean next-token CE over positions after the BOS, computed with TransformerLens's own
    loss and hooks (not through saekit)."""
    hooks = [(hook, lambda act, hook: fn(act))] if hook else []
    with torch.no_grad(), tl_model.hooks(fwd_hooks=hooks):
        per_token = tl_model(tokens, return_type="loss", loss_per_token=True)  # [b, pos - 1]
    return float(per_token[:, 1:].double().mean())  # drop the prediction made from the BOS


def test_identity_sae_scores_one_and_zero_sae_scores_zero(backend, tl_model) -> None:
    hook = "blocks.1.hook_resid_pre"
    batches = token_batches()
    ident, zero = evaluate_saes(
        backend, [identity_sae(D_MODEL, hook), zero_sae(D_MODEL, hook)], batches
    )
    assert ident.explained_variance == pytest.approx(1.0, abs=1e-12)
    assert ident.mse == pytest.approx(0.0, abs=1e-12)
    assert ident.ce_loss_score == pytest.approx(1.0, abs=1e-6)
    assert ident.kl_div_with_sae == pytest.approx(0.0, abs=1e-7)  # the model against itself
    assert ident.kl_div_score == pytest.approx(1.0, abs=1e-6)
    assert ident.l0 == pytest.approx(D_MODEL)  # one of the two latents per coordinate
    assert zero.ce_loss_score == pytest.approx(0.0, abs=1e-12)
    assert zero.kl_div_score == pytest.approx(0.0, abs=1e-12)
    assert zero.ce_loss_with_sae == zero.ce_loss_with_ablation
    assert zero.l0 == 0.0 and zero.dead_fraction == 1.0

    # CE figures against TransformerLens's own loss; BOS excluded as a position and target.
    def zero_after_bos(act):
        out = act.clone()
        out[:, 1:] = 0
        return out

    clean = sum(reference_ce(tl_model, t) for t in batches) / len(batches)
    ablated = sum(reference_ce(tl_model, t, hook, zero_after_bos) for t in batches) / 2
    assert ident.ce_loss_without_sae == pytest.approx(clean, rel=1e-5)
    assert zero.ce_loss_with_ablation == pytest.approx(ablated, rel=1e-5)
    assert ident.n_tokens == 2 * 3 * 11  # BOS masked
    assert ident.n_prediction_tokens == 2 * 3 * 10


def test_zero_sae_explained_variance_matches_activations(backend, tl_model) -> None:
    hook = "blocks.0.hook_resid_post"
    batches = token_batches()
    (zero,) = evaluate_saes(backend, [zero_sae(D_MODEL, hook)], batches, downstream=False)
    with torch.no_grad():
        acts = (
            torch.cat(
                [tl_model.run_with_cache(t, names_filter=hook)[1][hook][:, 1:] for t in batches]
            )
            .reshape(-1, D_MODEL)
            .double()
        )
    sq = acts.pow(2).sum(-1).mean()
    var = (acts - acts.mean(0)).pow(2).sum(-1).mean()
    assert zero.mse == pytest.approx(float(sq), rel=1e-6)
    assert zero.explained_variance == pytest.approx(float(1 - sq / var), rel=1e-6)
    assert zero.ce_loss_score is None and "ce_loss_score" not in zero.to_dict()


def test_one_pass_runs_the_model_once_per_role(backend) -> None:
    class CountingBackend:
        """Delegates to the real backend and counts forward passes."""

        def __init__(self, inner) -> None:
            self.inner = inner
            self.logit_calls = 0
            self.activation_calls = 0

        tokenizer = property(lambda self: self.inner.tokenizer)
        device = property(lambda self: self.inner.device)

        def hook_names(self):
            return self.inner.hook_names()

        def activations(self, tokens, hooks):
            self.activation_calls += 1
            return self.inner.activations(tokens, hooks)

        def logits(self, tokens, replacements=None):
            self.logit_calls += 1
            return self.inner.logits(tokens, replacements)

    a, b = "blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"
    saes = [zero_sae(D_MODEL, a), identity_sae(D_MODEL, a), identity_sae(D_MODEL, b)]
    counting = CountingBackend(backend)
    batches = token_batches(n_batches=2)
    together = evaluate_saes(counting, saes, batches)
    # per batch: 1 clean + 3 spliced + 2 ablated sites
    assert counting.logit_calls == 2 * 6 and counting.activation_calls == 0
    for sae, joint in zip(saes, together, strict=True):
        (alone,) = evaluate_saes(backend, [sae], batches)
        assert joint.to_dict() == pytest.approx(alone.to_dict(), nan_ok=True)
    counting.logit_calls = 0
    evaluate_saes(counting, saes, batches, downstream=False)
    assert counting.logit_calls == 0 and counting.activation_calls == 2


def test_transcoder_reconstructs_its_output_hook(backend, tl_model) -> None:
    hook_in, hook_out = "blocks.0.hook_resid_pre", "blocks.0.hook_resid_post"
    tc = SAE.from_config(
        SAEConfig(
            "transcoder",
            d_in=D_MODEL,
            d_sae=2 * D_MODEL,
            d_out=D_MODEL,
            metadata=SAEMetadata(hook_name=hook_in, hook_name_out=hook_out),
        )
    )
    ref = identity_sae(D_MODEL, hook_in)
    with torch.no_grad():
        for name, p in ref.state_dict().items():
            getattr(tc, name).copy_(p)
    batches = token_batches()
    (m,) = evaluate_saes(backend, [tc], batches)
    # It copies resid_pre, so its error is resid_post - resid_pre, computed here directly.
    errs = []
    for t in batches:
        _, cache = tl_model.run_with_cache(t, names_filter=[hook_in, hook_out])
        errs.append((cache[hook_out] - cache[hook_in])[:, 1:].reshape(-1, D_MODEL))
    expected = torch.cat(errs).double().pow(2).sum(-1).mean()
    assert m.mse == pytest.approx(float(expected), rel=1e-5)
    assert m.ce_loss_score < 1.0
    # resid_post of block 0 is resid_pre of block 1: copying it there is exact.
    tc.cfg.metadata.hook_name, tc.cfg.metadata.hook_name_out = hook_out, "blocks.1.hook_resid_pre"
    (exact,) = evaluate_saes(backend, [tc], batches)
    assert exact.explained_variance == pytest.approx(1.0, abs=1e-12)
    assert exact.ce_loss_score == pytest.approx(1.0, abs=1e-6)


def test_attention_head_saes(backend, tl_model) -> None:
    hook = "blocks.0.attn.hook_z"
    n_heads, d_head = 2, D_MODEL // 2
    batches = token_batches()
    flat = identity_sae(n_heads * d_head, hook, reshape_activations="hook_z")
    head = zero_sae(d_head, hook, metadata={"hook_head_index": 1})
    m_flat, m_head = evaluate_saes(backend, [flat, head], batches)
    assert m_flat.explained_variance == pytest.approx(1.0, abs=1e-12)
    assert m_flat.ce_loss_score == pytest.approx(1.0, abs=1e-6)
    assert m_head.ce_loss_score == pytest.approx(0.0, abs=1e-12)

    def zero_head_1(act):
        out = act.clone()
        out[:, 1:, 1] = 0
        return out

    expected = sum(reference_ce(tl_model, t, hook, zero_head_1) for t in batches) / 2
    assert m_head.ce_loss_with_ablation == pytest.approx(expected, rel=1e-5)
    assert m_head.ce_loss_with_ablation != pytest.approx(m_flat.ce_loss_with_ablation)


@pytest.mark.parametrize(
    "architecture",
    [a for a in list_architectures() if not architecture_class(a).multi_site],  # CLTs: own tests
)
def test_every_architecture_evaluates(architecture, backend) -> None:
    is_tc = architecture_class(architecture).is_transcoder
    sae = random_sae(architecture, d_in=D_MODEL, d_sae=64, **({"d_out": D_MODEL} if is_tc else {}))
    hook = "blocks.0.hook_resid_post"
    site = SAESite("blocks.0.hook_resid_pre" if is_tc else hook, hook)
    (m,) = evaluate_saes(backend, [sae], token_batches(n_batches=1), sites=[site])
    values = m.to_dict()
    assert set(values) >= {"l0", "explained_variance", "ce_loss_score", "kl_div_score"}
    assert all(v == v for v in values.values())  # no NaN
    assert 0 <= m.dead_fraction <= 1 and m.l0 > 0


def test_hf_backend_identity_and_reference_ce(tokenizer) -> None:
    from saekit.models.hf import HFBackend

    model = tiny_gpt2(VOCAB, d_model=D_MODEL)
    hf = HFBackend(model, tokenizer=tokenizer)
    batches = token_batches(n_batches=1)
    (m,) = evaluate_saes(hf, [identity_sae(D_MODEL, "blocks.1.hook_resid_pre")], batches)
    assert m.ce_loss_score == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        logits = model(input_ids=batches[0]).logits
    ce = F.cross_entropy(logits[:, 1:-1].reshape(-1, VOCAB), batches[0][:, 2:].reshape(-1))
    assert m.ce_loss_without_sae == pytest.approx(float(ce), rel=1e-5)


def test_site_errors() -> None:
    sae = SAE.create("standard", 4, 8)
    with pytest.raises(ValueError, match="no hook_name"):
        sae_site(sae)
    tc = SAE.create("transcoder", 4, 8, metadata=SAEMetadata(hook_name="a"))
    with pytest.raises(ValueError, match="hook_name_out"):
        sae_site(tc)
    assert sae_site(tc, hook_out="b") == SAESite("a", "b")


def test_max_tokens_keeps_whole_sequences(backend) -> None:
    batches = token_batches(n_batches=3, batch=3, pos=12)  # 108 tokens
    sae = zero_sae(D_MODEL, "blocks.0.hook_resid_post")
    (m,) = evaluate_saes(backend, [sae], batches, downstream=False, max_tokens=60)
    # 36 tokens from the first batch, then 2 of the next batch's 3 rows (24 tokens); BOS masked
    assert m.n_tokens == (3 + 2) * 11
    with pytest.raises(ValueError, match="empty"):
        evaluate_saes(backend, [sae], [], downstream=False)
