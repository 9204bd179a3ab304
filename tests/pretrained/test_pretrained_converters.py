"""Each foreign layout, written by this test as it is published, loads into an SAE that computes
what the original code computes (the reference math is written out here, on the raw tensors)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from saekit import SAE
from saekit.io import releases

D_IN, D_SAE = 6, 10


def rand(*shape: int) -> Tensor:
    return torch.randn(*shape, generator=GEN)


GEN = torch.Generator().manual_seed(0)


def jumprelu_reference(x: Tensor, w_enc, b_enc, w_dec, b_dec, threshold, sub_b_dec=False):
    x_in = x - b_dec if sub_b_dec else x
    pre = x_in @ w_enc + b_enc
    acts = torch.relu(pre) * (pre > threshold)
    return acts @ w_dec + b_dec


@pytest.fixture
def x() -> Tensor:
    return rand(5, D_IN) * 3


def gemma_params() -> dict[str, Tensor]:
    return {
        "W_enc": rand(D_IN, D_SAE),
        "W_dec": rand(D_SAE, D_IN),
        "b_enc": rand(D_SAE) * 0.1,
        "b_dec": rand(D_IN),
        "threshold": rand(D_SAE).abs() * 0.5,
    }


def test_gemma_scope_1_npz(tmp_path: Path, x: Tensor) -> None:
    params = gemma_params()
    folder = tmp_path / "layer_12/width_16k/average_l0_82"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in params.items()})
    loaded = SAE.from_pretrained(str(tmp_path), "layer_12/width_16k/average_l0_82")
    sae = loaded.sae
    assert sae.cfg.architecture == "jumprelu"
    assert sae.cfg.apply_b_dec_to_input is False
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (D_IN, D_SAE)
    assert sae.cfg.metadata.hook_name == "blocks.12.hook_resid_post"
    expected = jumprelu_reference(
        x, *(params[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"))
    )
    torch.testing.assert_close(sae(x), expected)
    assert loaded.sparsity is None


def test_gemma_scope_1_transcoder(tmp_path: Path, x: Tensor) -> None:
    params = gemma_params()
    folder = tmp_path / "layer_3/width_16k/average_l0_76"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in params.items()})
    sae = SAE.from_pretrained(
        str(tmp_path), str(folder.relative_to(tmp_path)), layout="gemma_scope_transcoder"
    ).sae
    assert sae.cfg.architecture == "jumprelu_transcoder"
    assert sae.cfg.metadata.hook_name == "blocks.3.ln2.hook_normalized"
    assert sae.cfg.metadata.hook_name_out == "blocks.3.hook_mlp_out"
    expected = jumprelu_reference(
        x, *(params[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"))
    )
    torch.testing.assert_close(sae(x), expected)


def test_gemma_scope_2_safetensors_lowercase_names(tmp_path: Path, x: Tensor) -> None:
    params = gemma_params()
    stored = {
        ("w_enc" if k == "W_enc" else "w_dec" if k == "W_dec" else k): v for k, v in params.items()
    }
    folder = tmp_path / "resid_post/layer_17_width_16k_l0_big"
    folder.mkdir(parents=True)
    save_file(stored, str(folder / "params.safetensors"))
    sae = SAE.from_pretrained(str(tmp_path), "resid_post/layer_17_width_16k_l0_big").sae
    assert sae.cfg.metadata.hook_name == "blocks.17.hook_resid_post"
    expected = jumprelu_reference(
        x, *(params[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"))
    )
    torch.testing.assert_close(sae(x), expected)


def test_gemma_scope_2_affine_transcoder_loads_with_skip_path(tmp_path: Path, x: Tensor) -> None:
    folder = tmp_path / "transcoder/layer_1_width_16k_l0_big_affine"
    folder.mkdir(parents=True)
    params, affine = gemma_params(), rand(D_IN, D_IN)
    save_file({**params, "affine_skip_connection": affine}, str(folder / "params.safetensors"))
    sae = SAE.from_pretrained(str(tmp_path), "transcoder/layer_1_width_16k_l0_big_affine").sae
    assert sae.cfg.architecture == "jumprelu_skip_transcoder"
    expected = jumprelu_reference(
        x, *(params[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"))
    )
    torch.testing.assert_close(sae(x), expected + x @ affine)


def test_llama_scope_with_norm_scaling_factor_folded(
    tmp_path: Path, x: Tensor, monkeypatch: pytest.MonkeyPatch, hub_cache, offline
) -> None:
    enc_w, enc_b = rand(D_SAE, D_IN), rand(D_SAE) * 0.1
    dec_w, dec_b = rand(D_IN, D_SAE), rand(D_IN)
    theta, scale = 0.3, 2.5
    folder = tmp_path / "published"
    (folder / "checkpoints").mkdir(parents=True)
    linear = {"encoder.weight": enc_w, "encoder.bias": enc_b}
    linear.update({"decoder.weight": dec_w, "decoder.bias": dec_b})
    save_file(linear, str(folder / "checkpoints/final.safetensors"))
    hyper = {
        "d_model": D_IN,
        "d_sae": D_SAE,
        "jump_relu_threshold": theta,
        "hook_point_in": "blocks.5.hook_resid_post",
        "hook_point_out": "blocks.5.hook_resid_post",
        "norm_activation": "dataset-wise",
    }
    (folder / "hyperparams.json").write_text(json.dumps(hyper))
    # Published in a Hub repo (here: already in the cache) and described by a registry entry
    # that carries the dataset-wide scaling factor.
    hub_cache.add_folder("fnlp/test-llama-scope", folder, "Llama3_1-8B-Base-L5R-8x")
    monkeypatch.setattr(releases, "_EXTRA", {})
    entry = {"id": "l5r_8x", "path": "Llama3_1-8B-Base-L5R-8x", "norm_scaling_factor": scale}
    releases.register_release(
        "llama-scope-test",
        {
            "model": "meta-llama/Llama-3.1-8B",
            "repo_id": "fnlp/test-llama-scope",
            "layout": "llama_scope",
            "saes": [entry],
        },
    )
    loaded = SAE.from_pretrained("llama-scope-test", "l5r_8x", cache_dir=hub_cache.dir)
    sae = loaded.sae
    assert sae.cfg.architecture == "jumprelu"
    assert sae.cfg.normalize_activations == "none"  # the scale now lives in the weights
    # The original: scale inputs by s, run the SAE, unscale the output.
    thresholds = torch.full((D_SAE,), theta)
    expected = jumprelu_reference(x * scale, enc_w.T, enc_b, dec_w.T, dec_b, thresholds) / scale
    torch.testing.assert_close(sae(x), expected)
    assert loaded.cfg_dict["metadata"]["hook_name"] == "blocks.5.hook_resid_post"
    unfolded = SAE.from_pretrained(
        "llama-scope-test", "l5r_8x", cache_dir=hub_cache.dir, fold_norm_scaling=False
    ).sae
    assert unfolded.cfg.normalize_activations == "expected_average_only_in"
    torch.testing.assert_close(unfolded(x * scale), expected * scale)
    # SAELens's fold_W_dec_norm argument: unit decoder rows, the same function.
    unit_rows = SAE.from_pretrained(
        "llama-scope-test", "l5r_8x", cache_dir=hub_cache.dir, fold_W_dec_norm=True
    )
    torch.testing.assert_close(unit_rows.W_dec.norm(dim=1), torch.ones(D_SAE))
    torch.testing.assert_close(unit_rows(x), expected)


def _write_dictionary_learning(folder: Path, dict_class: str, state: dict, **trainer) -> None:
    folder.mkdir(parents=True)
    torch.save(state, folder / "ae.pt")
    config = {
        "trainer": {
            "dict_class": dict_class,
            "activation_dim": D_IN,
            "dict_size": D_SAE,
            "layer": 3,
            "lm_name": "EleutherAI/pythia-70m-deduped",
            "submodule_name": "resid_post_layer_3",
            **trainer,
        },
        "buffer": {"d_submodule": D_IN, "ctx_len": 128},
    }
    (folder / "config.json").write_text(json.dumps(config))


def test_dictionary_learning_standard(tmp_path: Path, x: Tensor) -> None:
    enc_w, enc_b, dec_w, bias = rand(D_SAE, D_IN), rand(D_SAE), rand(D_IN, D_SAE), rand(D_IN)
    state = {"encoder.weight": enc_w, "encoder.bias": enc_b, "decoder.weight": dec_w, "bias": bias}
    _write_dictionary_learning(tmp_path / "trainer_0", "AutoEncoder", state)
    sae = SAE.from_pretrained(str(tmp_path), "trainer_0").sae
    assert sae.cfg.architecture == "standard"
    assert sae.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    assert sae.cfg.metadata.context_size == 128
    f = torch.relu((x - bias) @ enc_w.T + enc_b)
    torch.testing.assert_close(sae(x), f @ dec_w.T + bias)


def test_dictionary_learning_topk(tmp_path: Path, x: Tensor) -> None:
    enc_w, enc_b, dec_w, b_dec = rand(D_SAE, D_IN), rand(D_SAE), rand(D_IN, D_SAE), rand(D_IN)
    state = {
        "encoder.weight": enc_w,
        "encoder.bias": enc_b,
        "decoder.weight": dec_w,
        "b_dec": b_dec,
        "k": torch.tensor(3),
    }
    _write_dictionary_learning(tmp_path / "t", "AutoEncoderTopK", state, k=3)
    sae = SAE.from_pretrained(str(tmp_path), "t").sae
    assert (sae.cfg.architecture, sae.cfg.k) == ("topk", 3)
    post = torch.relu((x - b_dec) @ enc_w.T + enc_b)
    top = post.topk(3, dim=-1)
    f = torch.zeros_like(post).scatter(-1, top.indices, top.values)
    torch.testing.assert_close(sae(x), f @ dec_w.T + b_dec)


def test_dictionary_learning_gated(tmp_path: Path, x: Tensor) -> None:
    enc_w, dec_w, dec_b = rand(D_SAE, D_IN), rand(D_IN, D_SAE), rand(D_IN)
    gate_b, mag_b, r_mag = rand(D_SAE), rand(D_SAE), rand(D_SAE) * 0.1
    state = {
        "encoder.weight": enc_w,
        "decoder.weight": dec_w,
        "decoder_bias": dec_b,
        "gate_bias": gate_b,
        "mag_bias": mag_b,
        "r_mag": r_mag,
    }
    _write_dictionary_learning(tmp_path / "g", "GatedAutoEncoder", state)
    sae = SAE.from_pretrained(str(tmp_path), "g").sae
    assert sae.cfg.architecture == "gated"
    x_enc = (x - dec_b) @ enc_w.T
    f = (x_enc + gate_b > 0).float() * torch.relu(torch.exp(r_mag) * x_enc + mag_b)
    torch.testing.assert_close(sae(x), f @ dec_w.T + dec_b)


def test_dictionary_learning_batchtopk_uses_the_global_threshold(tmp_path: Path, x: Tensor) -> None:
    enc_w, enc_b, dec_w, b_dec = rand(D_SAE, D_IN), rand(D_SAE), rand(D_IN, D_SAE), rand(D_IN)
    state = {
        "encoder.weight": enc_w,
        "encoder.bias": enc_b,
        "decoder.weight": dec_w,
        "b_dec": b_dec,
        "threshold": torch.tensor(0.7),
        "k": torch.tensor(4),
    }
    _write_dictionary_learning(tmp_path / "b", "BatchTopKSAE", state, k=4)
    sae = SAE.from_pretrained(str(tmp_path), "b").sae
    assert sae.cfg.architecture == "jumprelu"
    post = torch.relu((x - b_dec) @ enc_w.T + enc_b)
    f = post * (post > 0.7)
    torch.testing.assert_close(sae(x), f @ dec_w.T + b_dec)


def test_dictionary_learning_refuses_pickled_code(tmp_path: Path) -> None:
    folder = tmp_path / "evil"
    _write_dictionary_learning(folder, "AutoEncoder", {"encoder.weight": rand(D_SAE, D_IN)})
    torch.save({"payload": math.sqrt}, folder / "ae.pt")  # a function, not a tensor
    with pytest.raises(ValueError, match="could not be read as a torch state dict"):
        SAE.from_pretrained(str(tmp_path), "evil")


def test_sparsify(tmp_path: Path, x: Tensor) -> None:
    enc_w, enc_b, w_dec, b_dec = rand(D_SAE, D_IN), rand(D_SAE), rand(D_SAE, D_IN), rand(D_IN)
    folder = tmp_path / "layers.4"
    folder.mkdir()
    save_file(
        {"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": w_dec, "b_dec": b_dec},
        str(folder / "sae.safetensors"),
    )
    (folder / "cfg.json").write_text(
        json.dumps(
            {
                "expansion_factor": 2,
                "normalize_decoder": True,
                "num_latents": D_SAE,
                "k": 4,
                "multi_topk": False,
                "skip_connection": False,
                "d_in": D_IN,
            }
        )
    )
    sae = SAE.from_pretrained(str(tmp_path), "layers.4").sae
    assert (sae.cfg.architecture, sae.cfg.k) == ("topk", 4)
    assert sae.cfg.metadata.hook_name == "blocks.4.hook_resid_post"
    post = torch.relu((x - b_dec) @ enc_w.T + enc_b)
    top = post.topk(4, dim=-1)
    recon = torch.einsum("bk,bkd->bd", top.values, w_dec[top.indices]) + b_dec
    torch.testing.assert_close(sae(x), recon)


def test_unsupported_registry_layout_is_named(monkeypatch) -> None:
    from saekit.io.converters import converter_for

    with pytest.raises(ValueError, match="'made_up' .* not supported.*supported layouts: native"):
        converter_for("made_up")


def test_folder_without_any_sae_says_what_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="looked for cfg.json, params.npz"):
        SAE.from_pretrained(str(tmp_path), "empty")


def test_gemma_scope_1_embedding_takes_out_the_input_scaling(tmp_path: Path, x: Tensor) -> None:
    params = gemma_params()
    folder = tmp_path / "embedding/width_4k/average_l0_6"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in params.items()})
    sae = SAE.from_pretrained(str(tmp_path), "embedding/width_4k/average_l0_6").sae
    assert sae.cfg.metadata.hook_name == "hook_embed"
    # hook_embed carries embeddings times sqrt(d_model); the SAE saw the table's rows.
    s = math.sqrt(D_IN)
    pre = (x / s) @ params["W_enc"] + params["b_enc"]
    acts = torch.relu(pre) * (pre > params["threshold"])
    torch.testing.assert_close(sae.encode(x), acts)
    # and decodes back into hook_embed's scale
    torch.testing.assert_close(sae.decode(acts), (acts @ params["W_dec"]) * s + params["b_dec"])


def test_llama_scope_r1_distill(tmp_path: Path, x: Tensor) -> None:
    enc_w, enc_b = rand(D_SAE, D_IN), rand(D_SAE) * 0.1
    dec_w, dec_b = rand(D_IN, D_SAE), rand(D_IN)
    log_theta = rand(D_SAE) * 0.1 - 1
    folder = tmp_path / "800M-Slimpajama-0-OpenR1-Math-220k/L3R"
    folder.mkdir(parents=True)
    stored = {"encoder.weight": enc_w, "encoder.bias": enc_b, "decoder.weight": dec_w}
    stored.update({"decoder.bias": dec_b, "log_jumprelu_threshold": log_theta})
    save_file(stored, str(folder / "sae_weights.safetensors"))
    config = {"d_model": D_IN, "expansion_factor": 2, "hook_point_in": "blocks.3.hook_resid_post"}
    (folder / "config.json").write_text(json.dumps(config))
    sae = SAE.from_pretrained(
        str(tmp_path), str(folder.relative_to(tmp_path)), layout="llama_scope_r1_distill"
    ).sae
    expected = jumprelu_reference(x, enc_w.T, enc_b, dec_w.T, dec_b, log_theta.exp())
    torch.testing.assert_close(sae(x), expected)
