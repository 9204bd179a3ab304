"""The sparse top-k kernel against its dense eager twin: same outputs, same gradients."""

from __future__ import annotations

import pytest
import torch
from sae_factory import random_sae

from saekit import SAE, LossSettings
from saekit.kernels.sparse_topk import (
    SelectedLatents,
    batch_topk_pairs,
    dense_decode,
    encoder_pre_activations,
    sparse_decode,
    topk_pairs,
)


def _run(decode, params: dict[str, torch.Tensor], select, k: int, weight: torch.Tensor):
    leaves = {name: t.clone().requires_grad_(True) for name, t in params.items()}
    hidden_pre = encoder_pre_activations(leaves["x"], leaves["W_enc"], leaves["b_enc"])
    token, latent = select(torch.relu(hidden_pre), k)
    recon, values = decode(
        leaves["x"], leaves["W_enc"], leaves["b_enc"], leaves["W_dec"], leaves["b_dec"],
        hidden_pre, token, latent,
    )
    # A loss that uses both outputs, so both backward paths are exercised.
    loss = (recon * weight).sum() + (values**2).sum() * 0.3
    loss.backward()
    return recon, values, {name: t.grad for name, t in leaves.items()}


@pytest.mark.parametrize("select", [topk_pairs, batch_topk_pairs], ids=["topk", "batchtopk"])
@pytest.mark.parametrize(
    ("batch", "d_in", "d_sae", "k"),
    [(7, 5, 16, 1), (9, 6, 12, 12), (33, 17, 64, 8), (4, 3, 5, 2)],
)
def test_sparse_matches_dense(select, batch: int, d_in: int, d_sae: int, k: int) -> None:
    gen = torch.Generator().manual_seed(batch * 1000 + d_sae + k)
    params = {
        "x": torch.randn(batch, d_in, generator=gen, dtype=torch.float64),
        "W_enc": torch.randn(d_in, d_sae, generator=gen, dtype=torch.float64),
        "b_enc": torch.randn(d_sae, generator=gen, dtype=torch.float64) * 0.5,
        "W_dec": torch.randn(d_sae, d_in + 2, generator=gen, dtype=torch.float64),
        "b_dec": torch.randn(d_in + 2, generator=gen, dtype=torch.float64),
    }
    weight = torch.randn(batch, d_in + 2, generator=gen, dtype=torch.float64)
    fast = _run(sparse_decode, params, select, k, weight)
    slow = _run(dense_decode, params, select, k, weight)
    assert torch.allclose(fast[0], slow[0], atol=1e-10)
    assert torch.allclose(fast[1], slow[1], atol=1e-10)
    for name in params:
        assert torch.allclose(fast[2][name], slow[2][name], atol=1e-9), name


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "matryoshka_batchtopk"])
def test_training_forward_same_with_and_without_kernel(architecture: str) -> None:
    x = torch.randn(24, 8)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[::3] = True
    results = []
    for use_kernel in (True, False):
        sae = random_sae(architecture, k=4).double()
        out = sae.training_forward(
            x.double(), settings=LossSettings(use_sparse_kernel=use_kernel), dead_mask=dead
        )
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
        results.append((out, grads, sae.threshold.clone() if hasattr(sae, "threshold") else None))
    (fast, fast_grads, fast_thr), (slow, slow_grads, slow_thr) = results
    assert fast.losses.keys() == slow.losses.keys()
    for name in fast.losses:
        assert torch.allclose(fast.losses[name], slow.losses[name], atol=1e-10), name
    assert torch.allclose(fast.latents, slow.latents, atol=1e-12)
    for name in fast_grads:
        assert torch.allclose(fast_grads[name], slow_grads[name], atol=1e-9), name
    if fast_thr is not None:
        assert torch.equal(fast_thr, slow_thr)


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_rows_with_fewer_positive_scores_than_k(architecture: str) -> None:
    """The kernel path selects on raw pre-activations, the dense path on ReLU'd ones; where a
    row has fewer than k positive scores the two pick different zeros, which must not matter."""
    outputs = []
    for use_kernel in (True, False):
        sae = random_sae(architecture, k=6).double()
        with torch.no_grad():
            sae.b_enc.fill_(-3.0)  # most pre-activations negative
        x = torch.randn(10, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        out = sae.training_forward(x, settings=LossSettings(use_sparse_kernel=use_kernel))
        outputs.append(out)
    fast, slow = outputs
    positives = (((x - sae.b_dec) @ sae.W_enc + sae.b_enc) > 0).sum(dim=1)
    assert (positives < 6).any()
    assert torch.allclose(fast.recon, slow.recon, atol=1e-12)
    assert torch.allclose(fast.latents, slow.latents, atol=1e-12)


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "matryoshka_batchtopk", "standard"])
def test_fire_counts_match_the_dense_latents(architecture: str) -> None:
    sae = random_sae(architecture, k=4) if architecture != "standard" else random_sae(architecture)
    out = sae.training_forward(torch.randn(24, 8))
    counts = out.fire_counts()
    assert counts.shape == (32,) and counts.sum() > 0
    assert torch.equal(counts, (out.latents != 0).sum(dim=0))


@pytest.mark.parametrize("dominant_row", [False, True])
def test_batch_topk_pairs_match_one_search_over_the_batch(dominant_row: bool) -> None:
    scores = torch.randn(64, 200, generator=torch.Generator().manual_seed(5))
    if dominant_row:  # one row holds more than its 4k candidates of the batch's largest
        scores[7] += 100.0
    k = 3
    token, latent = batch_topk_pairs(scores, k)
    expected = scores.flatten().topk(k * 64).indices.sort().values
    assert torch.equal(token * 200 + latent, expected)
    assert torch.equal(token, token.sort().values)  # in row order
    if dominant_row:
        assert (token == 7).sum() > 4 * k


def test_pre_activation_memory_is_reused_but_not_under_autocast() -> None:
    sae = random_sae("topk", k=4)
    sae.training_forward(torch.randn(24, 8))
    held = sae._pre_activations
    sae.training_forward(torch.randn(24, 8))
    assert sae._pre_activations is held  # same batch shape: the same memory
    fresh = random_sae("topk", k=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fresh.training_forward(torch.randn(24, 8))
    assert not hasattr(fresh, "_pre_activations") and torch.isfinite(out.loss)


def test_training_output_unpacks_in_order() -> None:
    out = random_sae("topk", k=4).training_forward(torch.randn(6, 8))
    recon, latents, loss, losses = out
    assert recon is out.recon and loss is out.loss and losses is out.losses
    assert torch.equal(latents, out.latents) and latents.shape == (6, 32)


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
@pytest.mark.parametrize("shift", [-2.0, 0.0, 1.0])
def test_standard_sae_sparse_path_matches_the_dense_one(
    apply_b_dec_to_input: bool, shift: float
) -> None:
    """A standard SAE trained through the sparse kernel (chosen when the last step's L0 is
    low) gives the dense path's losses and gradients, from nearly silent to mostly firing."""
    gen = torch.Generator().manual_seed(int(shift * 10) + apply_b_dec_to_input)
    x = torch.randn(40, 8, generator=gen, dtype=torch.float64)
    b_dec = torch.randn(8, generator=gen, dtype=torch.float64)
    results = []
    for last_l0 in (None, 0.0):  # dense (unknown L0), then sparse (L0 0 last step)
        torch.manual_seed(3)
        sae = SAE.create("standard", 8, 48, apply_b_dec_to_input=apply_b_dec_to_input).double()
        with torch.no_grad():
            sae.b_enc.add_(shift)
            sae.b_dec.copy_(b_dec)
        settings = LossSettings(sparsity_coefficient=0.7)
        out = sae.training_forward(x, settings=settings, last_l0=last_l0)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
        results.append((out, grads))
    (slow, slow_grads), (fast, fast_grads) = results
    assert fast.losses.keys() == slow.losses.keys() == {"mse", "l1"}
    for name in fast.losses:
        assert torch.allclose(fast.losses[name], slow.losses[name], atol=1e-10), name
    assert torch.allclose(fast.latents, slow.latents, atol=1e-12)
    assert torch.equal(fast.fire_counts(), slow.fire_counts())
    for name in fast_grads:
        assert torch.allclose(fast_grads[name], slow_grads[name], atol=1e-9), name


def test_standard_sae_takes_the_sparse_path_only_when_few_latents_fired() -> None:
    sae = SAE.create("standard", 8, 100)
    x = torch.randn(16, 8)

    def path(last_l0: float | None, **extra: object) -> bool:
        settings = LossSettings(sparsity_coefficient=1.0, **extra)
        pass_ = sae.training_pass(x, sae.center(x), settings, last_l0)
        return isinstance(pass_[1], SelectedLatents)

    assert not path(None)  # the first step
    assert path(0.1 * 100) and not path(0.1 * 100 + 1)
    assert not path(1.0, use_sparse_kernel=False)
    tanh = SAE.create("tanh_relu", 8, 100)
    settings = LossSettings(sparsity_coefficient=1.0)
    assert not isinstance(tanh.training_pass(x, tanh.center(x), settings, 0.0)[1], SelectedLatents)
