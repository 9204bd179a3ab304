"""Cross-layer transcoders: the math against hand computation and transcoders, the folder
format, and the replacement model on tiny random models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from saekit import SAE
from saekit.analysis.replacement import clt_replacements, replacement_logits
from saekit.models import load_model
from saekit.models.tiny import tiny_gpt2, tiny_hooked_transformer, tiny_tokenizer
from saekit.saes.clt import CrossLayerTranscoder, layer_hooks, record_hooks
from saekit.saes.shapes import tensor_shapes

D, M, LAYERS = 8, 12, 3


@pytest.fixture(autouse=True)
def _single_thread(one_thread: None) -> None:
    """Tiny matmuls run fastest on one thread."""


def random_clt(
    activation: str, n_layers: int = LAYERS, seed: int = 0, **fields
) -> CrossLayerTranscoder:
    """A CLT with every tensor random (biases and thresholds too), so no term hides."""
    torch.manual_seed(seed)
    if activation in ("topk", "batchtopk"):
        fields.setdefault("k", 3)
    clt = SAE.create("clt", D, M, n_layers=n_layers, activation_fn=activation, **fields)
    with torch.no_grad():
        for name, t in clt.state_dict().items():
            t.copy_(torch.randn_like(t) * (0.1 if name == "threshold" else 1.0))
        if hasattr(clt, "threshold"):
            clt.threshold.abs_()
    return clt


def by_hand(clt: CrossLayerTranscoder, x: torch.Tensor) -> torch.Tensor:
    """Every layer's output from the formula, one (source, target) decoder at a time."""
    n = clt.n_layers
    outs = []
    latents = []
    for i in range(n):
        h = x[:, i] @ clt.W_enc[i] + clt.b_enc[i]
        if clt.activation_fn == "relu":
            f = torch.relu(h)
        elif clt.activation_fn == "jumprelu":
            f = torch.where(h > clt.threshold[i], h, torch.zeros_like(h)) * (h > 0)
        else:  # topk
            f = torch.zeros_like(h)
            top = torch.relu(h).topk(clt.cfg.k, dim=-1)
            f.scatter_(-1, top.indices, top.values)
        latents.append(f)
    for j in range(n):
        y = clt.b_dec[j].expand(x.shape[0], -1).clone()
        for i in range(j + 1):
            y += latents[i] @ getattr(clt, f"W_dec_{i}")[:, j - i, :]
        outs.append(y)
    return torch.stack(outs, dim=1)


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_outputs_match_the_formula(activation: str) -> None:
    clt = random_clt(activation)
    x = torch.randn(6, LAYERS, D)
    torch.testing.assert_close(clt(x), by_hand(clt, x), rtol=1e-5, atol=1e-5)
    # One layer's own paths agree with the stacked ones.
    latents = [clt.encode_layer(x[:, i], i) for i in range(LAYERS)]
    torch.testing.assert_close(torch.stack(latents, 1), clt.encode(x))
    for j in range(LAYERS):
        torch.testing.assert_close(clt.decode_layer(latents, j), clt(x)[:, j], rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize(
    ("activation", "transcoder"), [("relu", "transcoder"), ("jumprelu", "jumprelu_transcoder")]
)
def test_one_layer_clt_is_a_transcoder(activation: str, transcoder: str) -> None:
    clt = random_clt(activation, n_layers=1)
    tensors = {
        "W_enc": clt.W_enc[0], "b_enc": clt.b_enc[0], "W_dec": clt.W_dec_0[:, 0],
        "b_dec": clt.b_dec[0],
    }
    if activation == "jumprelu":
        tensors["threshold"] = clt.threshold[0]
    tc = SAE.create(transcoder, D, M, d_out=D)
    tc.load_state_dict({k: v.detach().clone() for k, v in tensors.items()})
    x = torch.randn(10, D)
    torch.testing.assert_close(clt(x[:, None])[:, 0], tc(x))
    torch.testing.assert_close(clt.encode(x[:, None])[:, 0], tc.encode(x))
    # The training loss is the transcoder's too (sparsity terms included).
    y = torch.randn(10, D)
    a = clt.training_forward(x[:, None], y[:, None])
    b = tc.training_forward(x, y)
    torch.testing.assert_close(a.losses["mse"], b.losses["mse"])


def test_decoders_into_earlier_layers_do_not_exist() -> None:
    clt = random_clt("relu", n_layers=4)
    shapes = tensor_shapes(clt.cfg)
    decoders = {n: s for n, s in shapes.items() if n.startswith("W_dec")}
    assert decoders == {f"W_dec_{i}": (M, 4 - i, D) for i in range(4)}
    # L(L+1)/2 decoders in all: one per (source, target >= source) pair.
    assert sum(s[1] for s in decoders.values()) == 4 * 5 // 2
    # Latents of layer 2 alone change the outputs of layers 2 and 3 only.
    latents = torch.zeros(5, 4, M)
    latents[:, 2] = torch.rand(5, M)
    out = clt.decode(latents)
    torch.testing.assert_close(out[:, :2], clt.b_dec[:2].expand(5, -1, -1))
    assert not torch.allclose(out[:, 2:], clt.b_dec[2:].expand(5, -1, -1))


def test_bad_configs_and_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="activation_fn"):
        SAE.create("clt", D, M, n_layers=2, activation_fn="gelu")
    with pytest.raises(ValueError, match="apply_b_dec_to_input"):
        SAE.create("clt", D, M, n_layers=2, apply_b_dec_to_input=True)
    clt = random_clt("relu")
    with pytest.raises(ValueError, match=r"\[\.\.\., 3, 8\]"):
        clt(torch.randn(4, 2, D))


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk", "batchtopk"])
def test_save_and_load_round_trip(tmp_path: Path, activation: str) -> None:
    clt = random_clt(activation)
    record_hooks(clt, layer_hooks(range(3), "ln2.hook_normalized"),
                 layer_hooks(range(3), "hook_mlp_out"))
    sparsity = -torch.rand(LAYERS * M)
    clt.eval()
    folder = clt.save(tmp_path / "clt", sparsity=sparsity)
    loaded = SAE.load(folder)
    assert isinstance(loaded, CrossLayerTranscoder)
    published = "jumprelu" if activation == "batchtopk" else activation
    assert loaded.cfg.activation_fn == published
    assert loaded.cfg.n_layers == LAYERS
    assert loaded.cfg.metadata.extra["hook_names_out"][2] == "blocks.2.hook_mlp_out"
    x = torch.randn(7, LAYERS, D)
    torch.testing.assert_close(loaded(x), clt(x))
    from safetensors.torch import load_file

    torch.testing.assert_close(load_file(folder / "sparsity.safetensors")["sparsity"], sparsity)
    assert loaded.cfg.to_dict() == SAE.load(folder).cfg.to_dict()


def test_fold_decoder_norm_keeps_the_function() -> None:
    clt = random_clt("jumprelu")
    x = torch.randn(9, LAYERS, D)
    before = clt(x)
    clt.fold_W_dec_norm()
    torch.testing.assert_close(clt(x), before, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(clt.joint_decoder_norms(), torch.ones(LAYERS, M))


# ----- the replacement model on tiny random models ------------------------------------------

VOCAB = 300


@pytest.fixture(scope="module", params=["hf", "tl"])
def tiny_model(request):
    tok = tiny_tokenizer(VOCAB)
    if request.param == "hf":
        return load_model(tiny_gpt2(VOCAB, n_layer=3, d_model=16), tokenizer=tok)
    return load_model(tiny_hooked_transformer(VOCAB, n_layers=3, d_model=16, tokenizer=tok))


def model_clt(hook_in: str = "ln2.hook_normalized") -> CrossLayerTranscoder:
    torch.manual_seed(1)
    clt = SAE.create("clt", 16, 24, n_layers=3, activation_fn="relu")
    record_hooks(clt, layer_hooks(range(3), hook_in), layer_hooks(range(3), "hook_mlp_out"))
    return clt


def test_error_terms_leave_the_logits_unchanged(tiny_model) -> None:
    tokens = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    clt = model_clt()
    clean = tiny_model.logits(tokens)
    with_errors = replacement_logits(clt, tiny_model, tokens, error_terms=True)
    torch.testing.assert_close(with_errors, clean, rtol=1e-5, atol=1e-5)
    replaced = replacement_logits(clt, tiny_model, tokens)
    assert not torch.allclose(replaced, clean, atol=1e-3)


def test_error_terms_pass_gradients_through_the_clt(tiny_model) -> None:
    tokens = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    clt = model_clt()
    replacement_logits(clt, tiny_model, tokens, error_terms=True).sum().backward()
    assert clt.W_dec_0.grad is not None and clt.W_dec_0.grad.abs().sum() > 0


def test_a_silent_clt_is_every_mlp_ablated(tiny_model) -> None:
    # Zero decoders and biases: the replacement writes zeros at every MLP output.
    clt = model_clt("hook_resid_mid")
    with torch.no_grad():
        for w in clt.decoders():
            w.zero_()
        clt.b_dec.zero_()
    tokens = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    zeros = {f"blocks.{i}.hook_mlp_out": torch.zeros_like for i in range(3)}
    torch.testing.assert_close(
        replacement_logits(clt, tiny_model, tokens), tiny_model.logits(tokens, zeros)
    )


def test_the_first_layer_reads_the_clean_input(tiny_model) -> None:
    # Layer 0's input comes before any replaced output: its replaced MLP output is the CLT
    # applied to the clean model's input at layer 0.
    clt = model_clt()
    tokens = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    clean_in = tiny_model.activations(tokens, ["blocks.0.ln2.hook_normalized"])
    seen = {}

    def spy(act: torch.Tensor) -> torch.Tensor:
        seen["out"] = act
        return act

    hooks = clt_replacements(clt)
    replace = hooks["blocks.0.hook_mlp_out"]
    hooks["blocks.0.hook_mlp_out"] = lambda act: spy(replace(act))
    tiny_model.logits(tokens, hooks)
    expected = clt.decode_layer([clt.encode_layer(clean_in["blocks.0.ln2.hook_normalized"], 0)], 0)
    torch.testing.assert_close(seen["out"], expected, rtol=1e-5, atol=1e-5)


def test_transcoders_become_a_clt_without_cross_layer_decoders() -> None:
    from saekit.saes.clt import clt_from_transcoders

    torch.manual_seed(4)
    tcs = [SAE.create("jumprelu_transcoder", D, M, d_out=D) for _ in range(LAYERS)]
    for n, tc in enumerate(tcs):
        with torch.no_grad():
            for t in tc.state_dict().values():
                t.copy_(torch.randn_like(t))
            tc.threshold.abs_()
        tc.cfg.metadata.hook_name = f"blocks.{n}.ln2.hook_normalized"
        tc.cfg.metadata.hook_name_out = f"blocks.{n}.hook_mlp_out"
    clt = clt_from_transcoders(tcs)
    x = torch.randn(5, LAYERS, D)
    expected = torch.stack([tc(x[:, n]) for n, tc in enumerate(tcs)], dim=1)
    torch.testing.assert_close(clt(x), expected, rtol=1e-5, atol=1e-5)
    assert clt.cfg.metadata.extra["hook_names"][1] == "blocks.1.ln2.hook_normalized"


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk", "batchtopk"])
def test_each_rule_keeps_the_architecture_contract(activation: str) -> None:
    from dataclasses import fields

    from saekit import LossSettings

    clt = random_clt(activation)
    names = {f.name for f in fields(LossSettings)}
    assert clt.sparsity_control == ("k" if activation in ("topk", "batchtopk") else "coefficient")
    assert set(clt.loss_coefficients.values()) - {None} <= names
    assert set(clt.dead_latent_remedy.losses) <= set(clt.loss_coefficients)
    # The class answers for its default rule (topk) and names every rule's terms.
    assert set(clt.loss_coefficients) <= set(CrossLayerTranscoder.loss_coefficients)
    settings = LossSettings(sparsity_coefficient=0.1, threshold_pre_act_coefficient=0.01)
    x, y = torch.randn(16, LAYERS, D), torch.randn(16, LAYERS, D)
    out = clt.training_forward(x, y, settings, torch.ones(LAYERS * M, dtype=torch.bool))
    assert set(out.losses) <= {"mse", *clt.loss_coefficients}
    torch.testing.assert_close(out.loss, torch.stack(list(out.losses.values())).sum())
    out.loss.backward()
    assert clt.W_enc.grad is not None and clt.W_dec_2.grad is not None
