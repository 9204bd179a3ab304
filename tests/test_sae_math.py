"""Each architecture's encode/decode and loss terms against hand computations."""

from __future__ import annotations

import pytest
import torch
from sae_factory import random_sae

from saekit import (
    SAE,
    LossSettings,
    SAEConfig,
    architecture_class,
    list_architectures,
    register_architecture,
)
from saekit.kernels.affine import centred_affine
from saekit.kernels.jumprelu import JumpReLUFunction, JumpReLUWithL0, StepFunction
from saekit.kernels.sparse_topk import batch_topk_pairs

# Single-site SAEs: cross-layer transcoders (multi_site) have tests of their own.
ARCHITECTURES = [a for a in list_architectures() if not architecture_class(a).multi_site]


def test_standard_encode_decode_by_hand() -> None:
    sae = random_sae("standard")
    x = torch.randn(4, 8)
    expected_f = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    assert torch.allclose(sae.encode(x), expected_f)
    assert torch.allclose(sae.decode(expected_f), expected_f @ sae.W_dec + sae.b_dec)


def test_apply_b_dec_to_input_false_skips_centering() -> None:
    sae = random_sae("standard", apply_b_dec_to_input=False)
    x = torch.randn(4, 8)
    assert torch.allclose(sae.encode(x), torch.relu(x @ sae.W_enc + sae.b_enc))


def test_topk_keeps_k_largest_positive() -> None:
    sae = random_sae("topk", k=3)
    x = torch.randn(6, 8)
    h = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    f = sae.encode(x)
    assert ((f != 0).sum(-1) <= 3).all()
    for row_h, row_f in zip(h, f, strict=True):
        third_largest = row_h.sort(descending=True).values[2]
        kept = row_f != 0
        assert torch.equal(row_f[kept], row_h[kept])
        assert (row_h[~kept] <= third_largest + 1e-7).all()


def test_jumprelu_zeroes_below_threshold() -> None:
    sae = random_sae("jumprelu")
    x = torch.randn(5, 8)
    h = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    expected = torch.where(h > sae.threshold, h, torch.zeros_like(h))
    assert torch.allclose(sae.encode(x), expected)


def test_gated_formula() -> None:
    sae = random_sae("gated")
    x = torch.randn(5, 8)
    xc = x - sae.b_dec
    gate = (xc @ sae.W_enc + sae.b_gate > 0).float()
    mag = torch.relu(xc @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag)
    assert torch.allclose(sae.encode(x), gate * mag)


def test_skip_transcoder_adds_linear_path() -> None:
    sae = random_sae("skip_transcoder")
    x = torch.randn(5, 8)
    f = torch.relu(x @ sae.W_enc + sae.b_enc)
    expected = f @ sae.W_dec + sae.b_dec + x @ sae.W_skip.T
    assert sae(x).shape == (5, 11)
    assert torch.allclose(sae(x), expected, atol=1e-6)


def test_batch_top_k_keeps_k_times_batch() -> None:
    h = torch.relu(torch.randn(4, 16))
    token, latent = batch_topk_pairs(h, 2)
    assert token.numel() == 8
    kept = torch.zeros_like(h, dtype=torch.bool)
    kept[token, latent] = True
    assert (h[~kept] <= h[kept].min()).all()


def test_batchtopk_learns_a_threshold_and_publishes_as_jumprelu(tmp_path) -> None:
    sae = random_sae("batchtopk", k=4)
    x = torch.randn(64, 8)
    for _ in range(3):
        sae.training_forward(x)
    assert (sae.threshold > 0).all()
    published = sae.published()
    assert published.cfg.architecture == "jumprelu" and published.cfg.k is None
    assert torch.equal(published.encode(x), sae.encode(x))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_any_leading_dims_and_dtype_cast(architecture: str) -> None:
    sae = random_sae(architecture)
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    out = sae(x)
    assert out.dtype == torch.float32
    assert out.shape == (2, 3, sae.cfg.output_width)
    assert torch.allclose(out.reshape(6, -1), sae(x.reshape(6, 8)), atol=1e-6)
    assert sae.encode(x).shape == (2, 3, 32)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_fold_W_dec_norm_keeps_function(architecture: str) -> None:
    sae = random_sae(architecture, rescale_acts_by_decoder_norm=architecture == "topk")
    if architecture == "tanh_relu":  # tanh(c*h) != c*tanh(h): folding is refused
        with pytest.raises(ValueError, match="scale-equivariant"):
            sae.fold_W_dec_norm()
        return
    if architecture == "groupmax":  # unequal scales would change each group's winner
        with pytest.raises(ValueError, match="which latent wins each group"):
            sae.fold_W_dec_norm()
        return
    x = torch.randn(10, 8)
    before = sae(x)
    sae.fold_W_dec_norm()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32), atol=1e-5)
    assert torch.allclose(sae(x), before, atol=1e-5)


def test_topk_fold_refuses_to_change_the_ranking() -> None:
    sae = random_sae("topk")
    with pytest.raises(ValueError, match="rescale_acts_by_decoder_norm"):
        sae.fold_W_dec_norm()


def test_fold_activation_norm_scaling_factor() -> None:
    sae = random_sae("standard")
    x = torch.randn(5, 8)
    scale = 3.0
    trained_on_scaled = sae(x * scale) / scale
    sae.fold_activation_norm_scaling_factor(scale)
    assert torch.allclose(sae(x), trained_on_scaled, atol=1e-5)


def test_constant_norm_rescale_is_scale_equivariant() -> None:
    sae = random_sae("standard", normalize_activations="constant_norm_rescale")
    x = torch.randn(5, 8)
    assert torch.allclose(sae(7.0 * x), 7.0 * sae(x), atol=1e-4)
    # By hand: scale each token to norm sqrt(d_in), run, scale back.
    s = 8**0.5 / x.norm(dim=-1, keepdim=True)
    plain = random_sae("standard")
    assert torch.allclose(sae(x), plain(x * s) / s, atol=1e-5)


def test_layer_norm_mode_by_hand() -> None:
    sae = random_sae("standard", normalize_activations="layer_norm")
    plain = random_sae("standard")
    x = torch.randn(5, 8) * 3 + 1
    mu, sd = x.mean(-1, keepdim=True), x.std(-1, keepdim=True) + 1e-5
    assert torch.allclose(sae(x), plain((x - mu) / sd) * sd + mu, atol=1e-5)


def test_hook_z_reshape() -> None:
    sae = random_sae("standard", reshape_activations="hook_z")
    z = torch.randn(2, 3, 4, 2)  # [batch, pos, n_heads, d_head]
    out = sae(z)
    assert out.shape == z.shape
    flat = random_sae("standard")
    assert torch.allclose(out, flat(z.flatten(-2)).unflatten(-1, (4, 2)))
    with pytest.raises(ValueError, match="n_heads"):
        sae(torch.randn(2, 3, 3, 2))


def test_to_keeps_config_in_step() -> None:
    sae = random_sae("jumprelu")
    sae.to(dtype=torch.float64)
    assert sae.cfg.dtype == "float64" and sae.W_enc.dtype == torch.float64
    assert sae.encode(torch.randn(2, 8)).dtype == torch.float64
    sae.to("cpu", torch.bfloat16)
    assert sae.cfg.dtype == "bfloat16" and sae.cfg.device == "cpu"


def test_d_in_mismatch_names_both_sizes() -> None:
    sae = random_sae("standard")
    with pytest.raises(ValueError, match=r"last dimension 7.*expects 8"):
        sae.encode(torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"last dimension 31.*expects 32"):
        sae.decode(torch.randn(3, 31))


def test_registry_refuses_duplicates_and_lists_known() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_architecture("standard")(type("Other", (SAE,), {}))
    with pytest.raises(ValueError, match="known architectures: .*topk"):
        SAE.from_config(SAEConfig(architecture="nope", d_in=4, d_sae=8))


def test_users_can_register_an_architecture() -> None:
    @register_architecture("test_abs_relu")
    class AbsReLU(SAE):
        def activation(self, hidden_pre: torch.Tensor) -> torch.Tensor:
            return hidden_pre.abs()

    sae = SAE.create("test_abs_relu", 4, 8)
    x = torch.randn(3, 4)
    assert torch.allclose(sae.encode(x), ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).abs())


# ----- training loss terms ------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_training_forward_terms_sum_and_backprop(architecture: str) -> None:
    sae = random_sae(architecture)
    x = torch.randn(16, 8)
    target = torch.randn(16, sae.cfg.output_width) if sae.is_transcoder else None
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:10] = True
    out = sae.training_forward(x, target, LossSettings(sparsity_coefficient=0.1), dead)
    assert out.recon.shape == (16, sae.cfg.output_width) and out.latents.shape == (16, 32)
    assert torch.allclose(out.loss, sum(out.losses.values()))
    expected_mse = (out.recon - (x if target is None else target)).pow(2).sum(-1).mean()
    assert torch.allclose(out.losses["mse"], expected_mse)
    out.loss.backward()
    assert sae.W_dec.grad is not None and torch.isfinite(sae.W_dec.grad).all()


def test_standard_l1_is_weighted_by_decoder_norms() -> None:
    sae = random_sae("standard")
    x = torch.randn(16, 8)
    out = sae.training_forward(x, settings=LossSettings(sparsity_coefficient=0.5))
    f = out.latents
    expected = 0.5 * (f * sae.W_dec.norm(dim=1)).sum(-1).mean()
    assert torch.allclose(out.losses["l1"], expected)


def test_aux_k_by_hand() -> None:
    sae = random_sae("topk", k=2)
    x = torch.randn(4, 8)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[5:9] = True
    settings = LossSettings(k_aux=2, aux_k_coefficient=0.25)
    out = sae.training_forward(x, settings=settings, dead_mask=dead)
    h = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    e = x - out.recon
    expected = 0.0
    for row in range(4):
        dead_vals = h[row, 5:9]
        top = dead_vals.topk(2)
        e_hat = sum(v * sae.W_dec[5 + i] for v, i in zip(top.values, top.indices, strict=True))
        expected += (e_hat - e[row]).pow(2).sum()
    # Measured against the residual's mean squared norm per token (Gao et al. 2024).
    scale = e.pow(2).sum() / 4
    assert torch.allclose(out.losses["aux_k"], 0.25 * (expected / 4) / scale, atol=1e-5)
    assert "aux_k" not in sae.training_forward(x, settings=settings).losses


def test_matryoshka_prefix_losses_by_hand() -> None:
    sae = random_sae("matryoshka_batchtopk", k=8, matryoshka_widths=[4, 16, 32])
    x = torch.randn(8, 8)
    out = sae.training_forward(x)
    f = out.latents
    expected = sum(
        (f[:, :w] @ sae.W_dec[:w] + sae.b_dec - x).pow(2).sum(-1).mean() for w in (4, 16)
    )
    assert torch.allclose(out.losses["matryoshka_mse"], expected, atol=1e-5)


def test_jumprelu_straight_through_gradients() -> None:
    h = torch.tensor([[0.50, 0.1004, 0.0997, 0.0990]], requires_grad=True)
    theta = torch.full((4,), 0.1, requires_grad=True)
    eps = 0.001
    JumpReLUFunction.apply(h, theta, eps).sum().backward()
    # d/dh passes where the latent fires; d/dtheta = -(theta/eps) inside the window.
    assert torch.equal(h.grad, torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
    assert torch.allclose(theta.grad, torch.tensor([0.0, -100.0, -100.0, 0.0]))
    theta.grad = None
    StepFunction.apply(h.detach(), theta, eps).sum().backward()
    assert torch.allclose(theta.grad, torch.tensor([0.0, -1000.0, -1000.0, 0.0]))
    # With ste_to_input the input gets the negated threshold pseudo-derivative as well.
    h.grad = theta.grad = None
    JumpReLUFunction.apply(h, theta, eps, True).sum().backward()
    assert torch.allclose(h.grad, torch.tensor([[1.0, 101.0, 100.0, 0.0]]))
    assert torch.allclose(theta.grad, torch.tensor([0.0, -100.0, -100.0, 0.0]))
    h.grad = None
    StepFunction.apply(h, theta, eps, True).sum().backward()
    assert torch.allclose(h.grad, torch.tensor([[0.0, 1000.0, 1000.0, 0.0]]))


def test_gated_aux_loss_uses_frozen_decoder() -> None:
    sae = random_sae("gated")
    x = torch.randn(6, 8)
    out = sae.training_forward(x, settings=LossSettings(sparsity_coefficient=1.0))
    pi_gate = (x - sae.b_dec) @ sae.W_enc + sae.b_gate
    aux = (torch.relu(pi_gate) @ sae.W_dec + sae.b_dec - x).pow(2).sum(-1).mean()
    assert torch.allclose(out.losses["aux_reconstruction"], aux, atol=1e-5)
    sae.zero_grad()
    out.losses["aux_reconstruction"].backward()
    assert sae.W_dec.grad is None or torch.all(sae.W_dec.grad == 0)
    assert sae.b_gate.grad is not None and sae.b_gate.grad.abs().sum() > 0


def test_transcoder_needs_a_target() -> None:
    sae = random_sae("transcoder")
    with pytest.raises(ValueError, match="target"):
        sae.training_forward(torch.randn(3, 8))


def test_topk_fold_accepts_uniform_decoder_norms() -> None:
    """After an activation scale is folded in, every row has the same norm 1/s; folding that
    keeps the top-k ranking, so it is allowed and changes nothing."""
    sae = random_sae("topk", k=4)
    with torch.no_grad():
        sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True) * 2.5
    x = torch.randn(10, 8)
    before = sae(x)
    sae.fold_W_dec_norm()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32), atol=1e-5)
    assert torch.allclose(sae(x), before, atol=1e-5)


@pytest.mark.parametrize(
    ("architecture", "row_norm"), [("standard", 0.1), ("topk", 1.0), ("batchtopk", 1.0)]
)
def test_initial_weights_are_tied(architecture: str, row_norm: float) -> None:
    """Fresh SAEs start with W_enc = W_dec^T; topk-style ones at unit row norm (a small
    encoder leaves most latents dead after a short run), the rest at 0.1."""
    k = {"k": 4} if architecture != "standard" else {}
    sae = SAE.create(architecture, 16, 64, **k)
    norms = sae.W_dec.norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, row_norm), atol=1e-5)
    assert torch.equal(sae.W_enc, sae.W_dec.T)


# ----- fused training functions against plain autograd ---------------------------------------
# The training steps run through custom autograd functions that fuse element-wise passes; here
# each is checked, in float64, against the reference formulas written with ordinary torch ops
# (straight-through estimators by the detach trick), on values and on every gradient.


def _leaves(sae: SAE) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().requires_grad_(True) for n, p in sae.named_parameters()}


def _straight_through(theta: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """Zero in value; its gradient with respect to theta is `slope` times the upstream one."""
    return (theta - theta.detach()) * slope


def _assert_matches(sae: SAE, out_losses: dict, ref_losses: dict, leaves: dict) -> None:
    assert out_losses.keys() == ref_losses.keys()
    for name, value in ref_losses.items():
        assert torch.allclose(out_losses[name], value, rtol=1e-10, atol=1e-12), name
    sum(out_losses.values()).backward()
    sum(ref_losses.values()).backward()
    for name, param in sae.named_parameters():
        expected = leaves[name].grad
        assert expected is not None and param.grad is not None, name
        assert torch.allclose(param.grad, expected, rtol=1e-9, atol=1e-12), name


def _spread_thresholds(sae: SAE, bandwidth: float) -> None:
    """Thresholds of every kind the straight-through windows treat apart: negative, zero,
    within eps / 2 of zero, and ordinary ones where many pre-activations fall near them."""
    d_sae = sae.cfg.d_sae
    with torch.no_grad():
        sae.threshold.copy_(torch.rand(d_sae, dtype=sae.dtype) * 0.8)
        sae.threshold[0] = -0.05
        sae.threshold[1] = 0.0
        sae.threshold[2] = bandwidth / 4
        sae.threshold[3] = -bandwidth / 4


@pytest.mark.parametrize("sparsity", ["step", "tanh"])
@pytest.mark.parametrize("centre", [True, False])
@pytest.mark.parametrize(("ste_to_input", "pre_act"), [(False, 0.0), (True, 0.0), (True, 0.05)])
def test_jumprelu_training_matches_plain_autograd(
    sparsity: str, centre: bool, ste_to_input: bool, pre_act: float
) -> None:
    bandwidth, coefficient, tanh_scale = 0.2, 0.3, 2.5
    sae = random_sae("jumprelu", d_in=6, d_sae=24, seed=1, apply_b_dec_to_input=centre)
    sae.to(dtype=torch.float64)
    _spread_thresholds(sae, bandwidth)
    x = torch.randn(40, 6, dtype=torch.float64) * 2
    settings = LossSettings(
        sparsity_coefficient=coefficient,
        threshold_bandwidth=bandwidth,
        threshold_penalty=sparsity,
        ste_to_input=ste_to_input,
        threshold_pre_act_coefficient=pre_act,
        tanh_scale=tanh_scale,
    )
    out = sae.training_forward(x, settings=settings)

    p = _leaves(sae)
    theta = p["threshold"]
    h = ((x - p["b_dec"]) if centre else x) @ p["W_enc"] + p["b_enc"]
    z = torch.relu(h)
    # The estimators see theta - input; without ste_to_input only theta carries a gradient.
    jump_arg = theta - z if ste_to_input else theta
    step_arg = theta - h if ste_to_input else theta
    # f = ReLU(h) * 1[ReLU(h) > theta]; d f / d theta ~ -(theta / eps) rect((ReLU(h) - theta) / eps)
    rect_z = (((z - theta) / bandwidth).abs() < 0.5).double()
    f = z * (z > theta).double() + _straight_through(
        jump_arg, -theta.detach() / bandwidth * rect_z
    )
    recon = f @ p["W_dec"] + p["b_dec"]
    if sparsity == "step":
        # L0 = sum_i H(h_i - theta_i); d H / d theta ~ -(1 / eps) rect((h - theta) / eps)
        rect_h = (((h - theta) / bandwidth).abs() < 0.5).double()
        fired = (h > theta).double() + _straight_through(step_arg, -rect_h / bandwidth)
        penalty = fired.sum(-1).mean()
    else:
        penalty = torch.tanh(tanh_scale * f * p["W_dec"].norm(dim=1)).sum(-1).mean()
    reference = {"mse": (recon - x).pow(2).sum(-1).mean(), "l0": coefficient * penalty}
    if pre_act:
        # c * sum_i ||W_dec[i]|| ReLU(max(theta_i, 0) - h_i), the norms taken as constants
        below = torch.relu(theta.clamp_min(0) - h) * p["W_dec"].norm(dim=1).detach()
        reference["pre_act"] = pre_act * below.sum(-1).mean()

    assert rect_z.sum() > 10 and (h > theta).any() and (h <= theta).any()  # windows are used
    assert torch.allclose(out.latents, f)
    _assert_matches(sae, out.losses, reference, p)


def test_gated_training_matches_plain_autograd() -> None:
    coefficient = 0.7
    sae = random_sae("gated", d_in=6, d_sae=24, seed=2).to(dtype=torch.float64)
    x = torch.randn(40, 6, dtype=torch.float64)
    out = sae.training_forward(x, settings=LossSettings(sparsity_coefficient=coefficient))

    p = _leaves(sae)
    xc = x - p["b_dec"]
    pi_gate = xc @ p["W_enc"] + p["b_gate"]
    magnitude = torch.relu(xc @ (p["W_enc"] * torch.exp(p["r_mag"])) + p["b_mag"])
    f = (pi_gate > 0).double() * magnitude
    recon = f @ p["W_dec"] + p["b_dec"]
    gate_acts = torch.relu(pi_gate)
    aux_recon = gate_acts @ p["W_dec"].detach() + p["b_dec"].detach()
    reference = {
        "mse": (recon - x).pow(2).sum(-1).mean(),
        "l1": coefficient * (gate_acts * p["W_dec"].norm(dim=1)).sum(-1).mean(),
        "aux_reconstruction": (aux_recon - x).pow(2).sum(-1).mean(),
    }

    assert 0 < (f > 0).sum() < f.numel() and ((pi_gate > 0) & (magnitude == 0)).any()
    assert torch.allclose(out.latents, f)
    _assert_matches(sae, out.losses, reference, p)


@pytest.mark.parametrize("centre", [True, False])
@pytest.mark.parametrize("last_l0", [None, 0.0])  # the dense path, then the sparse one
def test_standard_training_matches_plain_autograd(centre: bool, last_l0: float | None) -> None:
    sae = random_sae("standard", d_in=6, d_sae=24, seed=3, apply_b_dec_to_input=centre)
    sae.to(dtype=torch.float64)
    x = torch.randn(40, 6, dtype=torch.float64)
    dead = torch.arange(24) % 3 == 0
    settings = LossSettings(sparsity_coefficient=0.4, dead_pre_act_coefficient=0.3)
    out = sae.training_forward(x, settings=settings, dead_mask=dead, last_l0=last_l0)

    p = _leaves(sae)
    centred = (x - p["b_dec"]) if centre else x
    f = torch.relu(centred @ p["W_enc"] + p["b_enc"])
    # The revival term holds the input and the decoder norms constant.
    h_dead = (centred.detach() @ p["W_enc"] + p["b_enc"])[:, dead]
    dead_norms = p["W_dec"].norm(dim=1).detach()[dead]
    reference = {
        "mse": (f @ p["W_dec"] + p["b_dec"] - x).pow(2).sum(-1).mean(),
        "l1": 0.4 * (f * p["W_dec"].norm(dim=1)).sum(-1).mean(),
        "dead_pre_act": 0.3 * (torch.relu(-h_dead) * dead_norms).sum(-1).mean(),
    }
    assert 0 < (h_dead > 0).double().mean() < 1  # dead latents below and above zero
    _assert_matches(sae, out.losses, reference, p)


@pytest.mark.parametrize("coefficient", [0.0, 1e-3])
def test_dead_pre_act_term_revives_silenced_latents(coefficient: float) -> None:
    """Latents silenced by a very negative bias stay dead without the term, and fire
    again within a few hundred steps with it, while the live latents keep working."""
    torch.manual_seed(0)
    sae = SAE.create("standard", 16, 64)
    with torch.no_grad():
        sae.b_enc[:16] = -3.0
    x = torch.randn(512, 16)
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
    settings = LossSettings(sparsity_coefficient=1e-2, dead_pre_act_coefficient=coefficient)
    ever_fired = torch.zeros(64, dtype=torch.bool)
    for _ in range(300):
        out = sae.training_forward(x, settings=settings, dead_mask=~ever_fired)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        ever_fired |= out.latents.detach().gt(0).any(0)
    assert ever_fired[16:].all()
    if coefficient:
        assert ever_fired[:16].all()
    else:
        assert not ever_fired[:16].any()


def test_centred_affine_gradients_including_the_input() -> None:
    x, centre = torch.randn(7, 5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    weight, bias = torch.randn(5, 9, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    upstream = torch.randn(7, 9, dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (x, centre, weight, bias)]
    ((centred_affine(*leaves)) * upstream).sum().backward()
    plain = [t.clone().requires_grad_(True) for t in (x, centre, weight, bias)]
    (((plain[0] - plain[1]) @ plain[2] + plain[3]) * upstream).sum().backward()
    for mine, ref in zip(leaves, plain, strict=True):
        assert torch.allclose(mine.grad, ref.grad, rtol=1e-12)


def test_jumprelu_window_decisions_match_the_formula_in_float32() -> None:
    """At the default bandwidth, in float32, with many pre-activations at the edge of the
    window: the sparse window search must decide each entry as rect((h - theta) / eps) does."""
    eps = 0.001
    theta = torch.rand(64) * 0.2 + 0.001
    offsets = (torch.rand(512, 64) - 0.5) * 2.2 * eps  # within about 1.1 eps of theta
    h = (theta + offsets).requires_grad_(True)
    t1 = theta.clone().requires_grad_(True)
    latents, l0, _ = JumpReLUWithL0.apply(h.detach().clone(), t1, eps, True)
    (latents.sum() + l0).backward()

    t2 = theta.clone().requires_grad_(True)
    z = torch.relu(h.detach())
    rect_z = (((z - t2) / eps).abs() < 0.5).float()
    rect_h = (((h.detach() - t2) / eps).abs() < 0.5).float()
    f = z * (z > t2).float() + _straight_through(t2, -t2.detach() / eps * rect_z)
    fired = (h.detach() > t2).float() + _straight_through(t2, -rect_h / eps)
    (f.sum() + fired.sum(-1).mean()).backward()

    assert 0.3 < rect_h.mean() < 0.6
    assert torch.equal(latents, f.detach())
    assert torch.allclose(t1.grad, t2.grad, rtol=1e-5)


@pytest.mark.parametrize("architecture", ["jumprelu", "gated"])
def test_fused_functions_refuse_a_second_backward(architecture: str) -> None:
    """They reuse their buffers for gradients; a second pass must fail loudly, not be wrong."""
    sae = random_sae(architecture)
    loss = sae.training_forward(torch.randn(6, 8), settings=LossSettings(0.1)).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward"):
        loss.backward()
