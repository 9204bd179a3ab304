"""Cross-layer transcoders with a skip connection (Gemma Scope 2's affine CLTs): the formula
by hand, a one-layer CLT against the skip transcoder, the folder format, training and the
held-out evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_clt import random_clt as random_plain_clt

from saekit import SAE
from saekit.data.tokens import TokenWindows, window_batches
from saekit.evals.crosslayer import evaluate_clt
from saekit.models import load_model
from saekit.models.tiny import TINY_TEXTS, tiny_hooked_transformer, tiny_tokenizer
from saekit.saes.clt import CrossLayerTranscoder, clt_from_transcoders, stack_layers
from saekit.training import TrainingSection
from saekit.training.multisite import train_clt

D, M, LAYERS = 8, 12, 3


@pytest.fixture(autouse=True)
def _single_thread(one_thread: None) -> None:
    """Tiny matmuls run fastest on one thread."""


def random_clt(activation: str = "jumprelu", n_layers: int = LAYERS, seed: int = 0,
               **fields: Any) -> CrossLayerTranscoder:
    """A skip CLT with every tensor random (W_skip too), so no term hides."""
    return random_plain_clt(activation, n_layers, seed, skip_connection=True, **fields)


def by_hand(clt: CrossLayerTranscoder, x: torch.Tensor) -> torch.Tensor:
    """y_j = sum_{i <= j} f_i @ W_dec_i[:, j - i] + b_dec[j] + x_j @ W_skip[j].T, one term at
    a time, with each layer's latents from its own encoder."""
    latents = []
    for i in range(clt.n_layers):
        h = x[:, i] @ clt.W_enc[i] + clt.b_enc[i]
        if clt.activation_fn == "relu":
            latents.append(torch.relu(h))
        else:
            latents.append(torch.where(h > clt.threshold[i], h, torch.zeros_like(h)) * (h > 0))
    return decode_by_hand(clt, x, latents)


def decode_by_hand(
    clt: CrossLayerTranscoder, x: torch.Tensor, latents: list[torch.Tensor]
) -> torch.Tensor:
    """[n, layers, d]: each layer j's output from every layer's latents (one decoder block
    W_dec_i[:, j - i] at a time, i <= j), its bias and its skip path x_j @ W_skip[j].T."""
    outs = []
    for j in range(clt.n_layers):
        y = clt.b_dec[j] + x[:, j] @ clt.W_skip[j].T
        for i in range(j + 1):
            y = y + latents[i] @ getattr(clt, f"W_dec_{i}")[:, j - i]
        outs.append(y)
    return torch.stack(outs, dim=1)


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_outputs_match_the_formula(activation: str) -> None:
    clt = random_clt(activation)
    assert clt.W_skip.shape == (LAYERS, D, D)
    x = torch.randn(6, LAYERS, D)
    expected = by_hand(clt, x)
    torch.testing.assert_close(clt(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(clt.reconstruct(x, clt.encode(x)), expected, rtol=1e-5, atol=1e-5)
    # decode is the decoders' part alone; the skip path is what is left.
    torch.testing.assert_close(clt.decode(clt.encode(x)) + clt.skip(x), expected, rtol=1e-5,
                               atol=1e-5)
    for j in range(LAYERS):
        latents = [clt.encode_layer(x[:, i], i) for i in range(j + 1)]
        layer_out = clt.decode_layer(latents, j) + clt.layer_skip(x[:, j], j)
        torch.testing.assert_close(layer_out, expected[:, j], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("activation", "transcoder"),
    [("relu", "skip_transcoder"), ("jumprelu", "jumprelu_skip_transcoder")],
)
def test_one_layer_clt_with_a_skip_is_the_skip_transcoder(activation: str, transcoder: str) -> None:
    clt = random_clt(activation, n_layers=1)
    tensors = {
        "W_enc": clt.W_enc[0], "b_enc": clt.b_enc[0], "W_dec": clt.W_dec_0[:, 0],
        "b_dec": clt.b_dec[0], "W_skip": clt.W_skip[0],
    }
    if activation == "jumprelu":
        tensors["threshold"] = clt.threshold[0]
    tc = SAE.create(transcoder, D, M, d_out=D)
    tc.load_state_dict({k: v.detach().clone() for k, v in tensors.items()})
    x, y = torch.randn(10, D), torch.randn(10, D)
    torch.testing.assert_close(clt(x[:, None])[:, 0], tc(x))
    # The training pass agrees too: the same reconstruction, the same loss terms.
    a = clt.training_forward(x[:, None], y[:, None])
    b = tc.training_forward(x, y)
    torch.testing.assert_close(a.recon[:, 0], b.recon)
    torch.testing.assert_close(a.losses["mse"], b.losses["mse"])


def test_skip_transcoders_become_a_skip_clt() -> None:
    torch.manual_seed(4)
    tcs = [SAE.create("jumprelu_skip_transcoder", D, M, d_out=D) for _ in range(LAYERS)]
    for tc in tcs:
        with torch.no_grad():
            for t in tc.state_dict().values():
                t.copy_(torch.randn_like(t))
            tc.threshold.abs_()
    clt = clt_from_transcoders(tcs)
    assert clt.cfg.skip_connection and clt.activation_fn == "jumprelu"
    x = torch.randn(5, LAYERS, D)
    expected = torch.stack([tc(x[:, n]) for n, tc in enumerate(tcs)], dim=1)
    torch.testing.assert_close(clt(x), expected, rtol=1e-5, atol=1e-5)
    plain = SAE.create("jumprelu_transcoder", D, M, d_out=D)
    with pytest.raises(ValueError, match="all have one of the architectures"):
        clt_from_transcoders([tcs[0], plain])


def test_the_skip_is_saved_and_loaded(tmp_path: Path) -> None:
    clt = random_clt("jumprelu")
    folder = clt.save(tmp_path / "skip")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["skip_connection"] is True
    loaded = SAE.load(folder)
    assert isinstance(loaded, CrossLayerTranscoder) and loaded.has_skip
    x = torch.randn(4, LAYERS, D)
    torch.testing.assert_close(loaded(x), clt(x))
    # A batchtopk CLT is published as jumprelu, its skip path with it.
    batch = random_clt("batchtopk", seed=1)
    with torch.no_grad():
        batch.threshold.copy_(torch.rand_like(batch.threshold))
    batch.eval()
    published = SAE.load(batch.save(tmp_path / "batch"))
    assert published.activation_fn == "jumprelu" and published.has_skip
    torch.testing.assert_close(published.W_skip, batch.W_skip)
    # Without a skip the key stays out of cfg.json, which reads as no skip.
    plain = SAE.create("clt", D, M, n_layers=LAYERS, activation_fn="relu")
    plain_cfg = json.loads((plain.save(tmp_path / "plain") / "cfg.json").read_text())
    assert "skip_connection" not in plain_cfg
    assert not SAE.load(tmp_path / "plain").has_skip
    assert "W_skip" not in dict(plain.named_parameters())
    with pytest.raises(ValueError, match="no skip connection"):
        plain.skip(x)
    with pytest.raises(ValueError, match="skip_connection must be true or false"):
        SAE.create("clt", D, M, n_layers=2, activation_fn="relu", skip_connection="yes")


def test_the_skip_starts_at_zero_and_gets_gradients() -> None:
    torch.manual_seed(0)
    clt = SAE.create("clt", D, M, n_layers=LAYERS, activation_fn="topk", k=3,
                     skip_connection=True)
    assert torch.equal(clt.W_skip, torch.zeros(LAYERS, D, D))
    x, y = torch.randn(16, LAYERS, D), torch.randn(16, LAYERS, D)
    out = clt.training_forward(x, y, dead_mask=torch.ones(LAYERS * M, dtype=torch.bool))
    out.loss.backward()
    assert clt.W_skip.grad is not None
    # At W_skip = 0 the MSE's gradient is -2 / batch * sum_b (y - recon)_l^T x_l per layer.
    residual = (y - out.recon).detach()
    expected = -2 * torch.einsum("blo,bld->lod", residual, x) / x.shape[0]
    torch.testing.assert_close(clt.W_skip.grad, expected, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_model() -> Any:
    tok = tiny_tokenizer(300)
    return load_model(tiny_hooked_transformer(300, n_layers=3, d_model=16, tokenizer=tok))


def test_a_skip_clt_trains_and_evaluates_with_its_skip(tiny_model: Any) -> None:
    torch.manual_seed(5)
    clt = SAE.create("clt", 16, 32, n_layers=3, activation_fn="topk", k=4, skip_connection=True)
    cfg = TrainingSection(tokens=6 * 64, batch_size=64, lr=3e-3)
    texts = list(TINY_TEXTS) * 40
    trained = train_clt(clt, tiny_model, texts, cfg, context_size=16).saes["clt"]
    assert trained.has_skip and float(trained.W_skip.detach().abs().max()) > 0  # it left zero
    # The evaluation's reconstruction is the whole output, skip path included: its FVU is
    # the one computed here from the model's activations and the formula.
    batches = window_batches(TokenWindows(texts, tiny_model.tokenizer, 16), 64, batch_size=2)
    result = evaluate_clt(trained, tiny_model, batches, downstream=False, special_ids=[])
    hooks_in = trained.cfg.metadata.extra["hook_names"]
    hooks_out = trained.cfg.metadata.extra["hook_names_out"]
    xs, ys = [], []
    for tokens in batches:
        acts = tiny_model.activations(tokens, hooks_in + hooks_out)
        xs.append(stack_layers(acts, hooks_in).reshape(-1, 3, 16))
        ys.append(stack_layers(acts, hooks_out).reshape(-1, 3, 16))
    x, y = torch.cat(xs), torch.cat(ys)
    with torch.no_grad():
        recon = by_hand_topk(trained, x)
    for layer in range(3):
        err = (y[:, layer] - recon[:, layer]).pow(2).sum()
        total = (y[:, layer] - y[:, layer].mean(0)).pow(2).sum()
        assert result.fvu[layer] == pytest.approx(float(err / total), rel=1e-3, abs=1e-5)


def by_hand_topk(clt: CrossLayerTranscoder, x: torch.Tensor) -> torch.Tensor:
    """`by_hand` for a top-k CLT: each layer keeps its k largest positive pre-activations."""
    assert clt.cfg.k is not None
    latents = []
    for i in range(clt.n_layers):
        h = torch.relu(x[:, i] @ clt.W_enc[i] + clt.b_enc[i])
        top = h.topk(clt.cfg.k, dim=-1)
        latents.append(torch.zeros_like(h).scatter(-1, top.indices, top.values))
    return decode_by_hand(clt, x, latents)


def test_the_replacement_model_writes_the_skip_path(tiny_model: Any) -> None:
    from saekit.analysis.replacement import replacement_logits

    torch.manual_seed(2)
    clt = SAE.create("clt", 16, 32, n_layers=3, activation_fn="relu", skip_connection=True)
    with torch.no_grad():
        clt.W_skip.copy_(torch.randn_like(clt.W_skip) / 4)
        clt.b_enc.fill_(0.05)
    hooks_in = [f"blocks.{n}.ln2.hook_normalized" for n in range(3)]
    hooks_out = [f"blocks.{n}.hook_mlp_out" for n in range(3)]
    # By hand: each input hook stores what it sees; each output hook writes the formula from
    # the inputs stored so far, which the replaced earlier outputs have already shaped.
    seen: dict[int, torch.Tensor] = {}

    def read(n: int) -> Any:
        def fn(act: torch.Tensor) -> torch.Tensor:
            seen[n] = act
            return act
        return fn

    def write(j: int) -> Any:
        def fn(act: torch.Tensor) -> torch.Tensor:
            flat = torch.stack([seen[i] for i in range(j + 1)], dim=-2)  # [b, p, j + 1, d]
            padded = torch.cat([flat, flat.new_zeros(*flat.shape[:-2], 3 - j - 1, 16)], -2)
            return by_hand(clt, padded.reshape(-1, 3, 16))[:, j].reshape(act.shape)
        return fn

    hooks = {h: read(n) for n, h in enumerate(hooks_in)}
    hooks.update({h: write(n) for n, h in enumerate(hooks_out)})
    tokens = torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = tiny_model.logits(tokens, hooks)
        got = replacement_logits(clt, tiny_model, tokens, hooks=(hooks_in, hooks_out))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, tiny_model.logits(tokens), atol=1e-3)
