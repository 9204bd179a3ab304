"""Cross-layer transcoders in circuit-tracer's layout: a folder laid out like mntss's CLT
repos loads whole (every encoder and decoder), and the CLT export reads back the same."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from saekit import SAE
from saekit.export.circuit_tracer import export_circuit_tracer_clt
from saekit.saes.clt import CrossLayerTranscoder, layer_hooks, record_hooks

N, D, M = 3, 6, 10


def write_mntss_folder(folder: Path, threshold: bool) -> dict[str, torch.Tensor]:
    """A CLT folder as mntss publishes one, written from the documented layout."""
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    raw: dict[str, torch.Tensor] = {}
    for n in range(N):
        enc = {
            f"W_enc_{n}": torch.randn(M, D, generator=g),
            f"b_enc_{n}": torch.randn(M, generator=g) * 0.1,
            f"b_dec_{n}": torch.randn(D, generator=g),
        }
        if threshold:
            enc[f"threshold_{n}"] = torch.rand(M, generator=g) * 0.5
        dec = {f"W_dec_{n}": torch.randn(M, N - n, D, generator=g)}
        save_file(enc, str(folder / f"W_enc_{n}.safetensors"))
        save_file(dec, str(folder / f"W_dec_{n}.safetensors"))
        raw.update(enc)
        raw.update(dec)
    config = {"model_kind": "cross_layer_transcoder", "model_name": "google/gemma-2-2b",
              "feature_input_hook": "mlp.hook_in", "feature_output_hook": "mlp.hook_out"}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return raw


def circuit_tracer_forward(raw: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The CLT's outputs [batch, N, D] computed the way circuit-tracer does, from the files'
    tensors: f_n = act(x_n @ W_enc_n.T + b_enc_n),
    y_m = sum_{n <= m} f_n @ W_dec_n[:, m - n] + b_dec_m."""
    feats = []
    for n in range(N):
        pre = x[:, n] @ raw[f"W_enc_{n}"].T + raw[f"b_enc_{n}"]
        if f"threshold_{n}" in raw:
            feats.append(pre * (pre > raw[f"threshold_{n}"]))
        else:
            feats.append(torch.relu(pre))
    outs = []
    for m in range(N):
        y = raw[f"b_dec_{m}"].expand(x.shape[0], D).clone()
        for n in range(m + 1):
            y = y + feats[n] @ raw[f"W_dec_{n}"][:, m - n]
        outs.append(y)
    return torch.stack(outs, dim=1)


@pytest.mark.parametrize("threshold", [True, False])
def test_mntss_clt_loads_whole(tmp_path: Path, threshold: bool) -> None:
    raw = write_mntss_folder(tmp_path / "clt", threshold)
    clt = SAE.from_pretrained(str(tmp_path / "clt"), layout="mntss_clt")
    assert isinstance(clt, CrossLayerTranscoder)
    assert clt.cfg.n_layers == N and clt.cfg.d_sae == M
    assert clt.cfg.activation_fn == ("jumprelu" if threshold else "relu")
    assert clt.cfg.metadata.extra["hook_names"][2] == "blocks.2.ln2.hook_normalized"
    assert clt.cfg.metadata.extra["hook_names_out"][0] == "blocks.0.hook_mlp_out"
    x = torch.randn(5, N, D)
    torch.testing.assert_close(clt(x), circuit_tracer_forward(raw, x), rtol=1e-5, atol=1e-5)


def test_a_misshapen_decoder_is_refused(tmp_path: Path) -> None:
    write_mntss_folder(tmp_path / "clt", threshold=True)
    save_file({"W_dec_1": torch.zeros(M, N, D)}, str(tmp_path / "clt" / "W_dec_1.safetensors"))
    with pytest.raises(ValueError, match=r"W_dec_1 has shape \[10, 3, 6\], expected \[10, 2, 6\]"):
        SAE.from_pretrained(str(tmp_path / "clt"), layout="mntss_clt")


@pytest.mark.parametrize("activation", ["jumprelu", "relu", "batchtopk"])
def test_export_round_trips_through_the_loader(tmp_path: Path, activation: str) -> None:
    torch.manual_seed(1)
    clt = SAE.create("clt", D, M, n_layers=N, activation_fn=activation, k=2)
    with torch.no_grad():
        for t in clt.state_dict().values():
            t.copy_(torch.randn_like(t))
        if hasattr(clt, "threshold"):
            clt.threshold.abs_()
    record_hooks(
        clt, layer_hooks(range(N), "hook_resid_mid"), layer_hooks(range(N), "hook_mlp_out")
    )
    clt.cfg.metadata.model_name = "gpt2"
    clt.eval()
    out = export_circuit_tracer_clt(clt, tmp_path / "ct")
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config == {"model_kind": "cross_layer_transcoder", "model_name": "gpt2",
                      "feature_input_hook": "hook_resid_mid", "feature_output_hook": "hook_mlp_out"}
    raw = {}
    for n in range(N):
        raw.update(load_file(out / f"W_enc_{n}.safetensors"))
        raw.update(load_file(out / f"W_dec_{n}.safetensors"))
    x = torch.randn(4, N, D)
    torch.testing.assert_close(circuit_tracer_forward(raw, x), clt(x), rtol=1e-5, atol=1e-5)
    loaded = SAE.from_pretrained(str(out), layout="mntss_clt")
    torch.testing.assert_close(loaded(x), clt(x), rtol=1e-5, atol=1e-5)


def test_topk_clts_are_refused(tmp_path: Path) -> None:
    clt = SAE.create("clt", D, M, n_layers=N, activation_fn="topk", k=2)
    with pytest.raises(ValueError, match="circuit-tracer does not compute"):
        export_circuit_tracer_clt(clt, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_gemma_scope_2_clt_loads_whole(tmp_path: Path) -> None:
    folder = tmp_path / "clt" / "width_16k_l0_small"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(3)
    raw = {}
    for n in range(N):
        w_dec = torch.randn(M, N, D, generator=g)
        w_dec[:, :n] = 0  # no decoders into earlier layers
        params = {
            "w_enc": torch.randn(D, M, generator=g), "b_enc": torch.randn(M, generator=g),
            "b_dec": torch.randn(D, generator=g), "threshold": torch.rand(M, generator=g),
            "w_dec": w_dec,
        }
        save_file(params, str(folder / f"params_layer_{n}.safetensors"))
        raw.update({
            f"W_enc_{n}": params["w_enc"].T, f"b_enc_{n}": params["b_enc"],
            f"b_dec_{n}": params["b_dec"], f"threshold_{n}": params["threshold"],
            f"W_dec_{n}": w_dec[:, n:],
        })
    clt = SAE.from_pretrained(str(folder), layout="gemma_scope_2_clt")
    assert clt.cfg.activation_fn == "jumprelu" and clt.cfg.n_layers == N
    x = torch.randn(4, N, D)
    torch.testing.assert_close(clt(x), circuit_tracer_forward(raw, x), rtol=1e-5, atol=1e-5)
    # Affine CLTs load with their skip connection (tests/pretrained/test_clt_releases.py);
    # skip weights in a folder not named `_affine` mean the folder and its weights disagree.
    save_file({"affine_skip_connection": torch.zeros(D, D), **load_file(
        folder / "params_layer_0.safetensors")}, str(folder / "params_layer_0.safetensors"))
    with pytest.raises(ValueError, match="folder and its weights do not match"):
        SAE.from_pretrained(str(folder), layout="gemma_scope_2_clt")
