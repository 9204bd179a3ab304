"""Whole cross-layer transcoders from the registry: the mntss CLT and Gemma Scope 2's CLTs
(plain and affine) load as one `clt` from repos laid out like the real ones, through
huggingface_hub's cache offline, and compute what the files' own formula says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save, save_file

from saekit import SAE
from saekit.cli import main as cli_main
from saekit.export.circuit_tracer import export_circuit_tracer_clt
from saekit.io.releases import get_release, match_releases, sae_facts
from saekit.saes.clt import CrossLayerTranscoder

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures/published_layouts"
MNTSS_REPO = FIXTURES / "mntss_clt_layer_transcoder/repo"
GS2_REPO = "google/gemma-scope-2-270m-pt"
N, D, M = 3, 6, 10


def jumprelu(pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """circuit-tracer's and Gemma Scope's rule: pre where pre > threshold, else 0."""
    return pre * (pre > threshold)


def circuit_tracer_outputs(raw: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Outputs [batch, n, d] from a circuit-tracer CLT's files (W_enc_<n> [d_sae, d], ...):
    y_m = sum_{n <= m} f_n @ W_dec_n[:, m - n] + b_dec_m (+ x_m @ W_skip_m)."""
    n_layers = x.shape[1]
    feats = []
    for n in range(n_layers):
        pre = x[:, n] @ raw[f"W_enc_{n}"].T + raw[f"b_enc_{n}"]
        threshold = raw.get(f"threshold_{n}")
        feats.append(torch.relu(pre) if threshold is None else jumprelu(pre, threshold))
    outs = []
    for m in range(n_layers):
        y = raw[f"b_dec_{m}"] + (x[:, m] @ raw[f"W_skip_{m}"] if f"W_skip_{m}" in raw else 0)
        for n in range(m + 1):
            y = y + feats[n] @ raw[f"W_dec_{n}"][:, m - n]
        outs.append(y)
    return torch.stack(outs, dim=1)


# ----- the registry ----------------------------------------------------------------------


def test_the_clt_releases_are_listed_as_clts(capsys: pytest.CaptureFixture[str]) -> None:
    found = {m.release.name: m for m in match_releases(architecture="clt")}
    assert {"mntss-gemma-2-2b-2.5m-clt", "gemma-scope-2-270m-pt-clt", "gemma-scope-2-1b-pt-clt",
            "gemma-scope-2-1b-it-clt"} <= set(found)
    release = get_release("mntss-gemma-2-2b-2.5m-clt")
    assert (release.repo_id, release.layout, release.model) == (
        "mntss/clt-gemma-2-2b-2.5M", "mntss_clt", "gemma-2-2b")
    assert release.repo_id == get_release("mntss-gemma-2-2b-2.5m-clt-as-per-layer").repo_id
    gs2 = get_release("gemma-scope-2-270m-pt-clt")
    assert gs2.sae("width_262k_l0_medium_affine").path == "clt/width_262k_l0_medium_affine"
    facts = sae_facts(gs2, gs2.sae("width_262k_l0_big"))
    assert (facts.architecture, facts.hook) == ("clt", "blocks.*.ln2.hook_normalized")
    # The per-layer CLT release stays a transcoder; "clt" is no author tag to drop.
    assert "mntss-gemma-2-2b-2.5m-clt-as-per-layer" not in found
    with pytest.raises(ValueError, match="unknown release"):
        get_release("gemma-scope-2-270m-pt")
    assert cli_main(["pretrained", "list", "--architecture", "clt"]) == 0
    out = capsys.readouterr().out
    assert "gemma-scope-2-1b-it-clt" in out and "mntss_clt" in out
    assert "gemma-scope-2-270m-pt-transcoders" not in out


# ----- mntss: circuit-tracer's layout -----------------------------------------------------


def test_the_mntss_clt_loads_whole_from_the_hub_cache(hub_cache, offline) -> None:
    hub_cache.add_folder("mntss/clt-gemma-2-2b-2.5M", MNTSS_REPO, "")
    clt = SAE.from_pretrained("mntss-gemma-2-2b-2.5m-clt", cache_dir=hub_cache.dir)
    assert isinstance(clt, CrossLayerTranscoder)
    assert (clt.n_layers, clt.cfg.d_in, clt.cfg.d_sae, clt.has_skip) == (3, 4, 8, False)
    assert clt.cfg.metadata.extra["hook_names"] == [
        f"blocks.{n}.hook_resid_mid" for n in range(3)]
    assert clt.cfg.metadata.model_name == "google/gemma-2-2b"  # the repo's config.yaml
    raw: dict[str, torch.Tensor] = {}
    for file in MNTSS_REPO.glob("*.safetensors"):
        raw.update(load_file(file))
    x = torch.randn(5, 3, 4)
    torch.testing.assert_close(clt(x), circuit_tracer_outputs(raw, x), rtol=1e-5, atol=1e-5)


def test_a_circuit_tracer_clt_with_skip_weights_loads_and_exports(tmp_path: Path) -> None:
    """circuit-tracer's CLT files hold W_skip_<n> [d, d] (applied as x @ W_skip_<n>) beside
    each encoder; saekit reads them into its skip path and writes them back."""
    folder = tmp_path / "ct"
    folder.mkdir()
    g = torch.Generator().manual_seed(1)
    raw: dict[str, torch.Tensor] = {}
    for n in range(N):
        enc = {f"W_enc_{n}": torch.randn(M, D, generator=g),
               f"b_enc_{n}": torch.randn(M, generator=g) * 0.1,
               f"b_dec_{n}": torch.randn(D, generator=g),
               f"threshold_{n}": torch.rand(M, generator=g) * 0.3,
               f"W_skip_{n}": torch.randn(D, D, generator=g)}
        dec = {f"W_dec_{n}": torch.randn(M, N - n, D, generator=g)}
        save_file(enc, str(folder / f"W_enc_{n}.safetensors"))
        save_file(dec, str(folder / f"W_dec_{n}.safetensors"))
        raw.update({**enc, **dec})
    (folder / "config.yaml").write_text(
        "model_kind: cross_layer_transcoder\nmodel_name: gpt2\n"
        "feature_input_hook: hook_resid_mid\nfeature_output_hook: hook_mlp_out\n"
    )
    clt = SAE.from_pretrained(str(folder))  # the layout told by W_enc_0.safetensors
    assert clt.has_skip and clt.W_skip.shape == (N, D, D)
    x = torch.randn(4, N, D)
    torch.testing.assert_close(clt(x), circuit_tracer_outputs(raw, x), rtol=1e-5, atol=1e-5)
    out = export_circuit_tracer_clt(clt, tmp_path / "again")
    written = load_file(out / "W_enc_1.safetensors")
    torch.testing.assert_close(written["W_skip_1"], raw["W_skip_1"])
    # One layer of it, as the per-layer layout loads it, keeps its skip path too: layer 1's
    # latents through its own decoder, b_dec_1 and x_1 @ W_skip_1.
    layer = SAE.from_pretrained(str(folder), "1", layout="mntss_clt_layer_transcoder")
    assert layer.cfg.architecture == "jumprelu_skip_transcoder"
    f1 = jumprelu(x[:, 1] @ raw["W_enc_1"].T + raw["b_enc_1"], raw["threshold_1"])
    own = f1 @ raw["W_dec_1"][:, 0] + raw["b_dec_1"] + x[:, 1] @ raw["W_skip_1"]
    torch.testing.assert_close(layer(x[:, 1]), own, rtol=1e-5, atol=1e-5)
    # Layers that disagree about the skip are refused.
    enc = load_file(folder / "W_enc_2.safetensors")
    del enc["W_skip_2"]
    save_file(enc, str(folder / "W_enc_2.safetensors"))
    with pytest.raises(ValueError, match="some layers have skip weights"):
        SAE.from_pretrained(str(folder), layout="mntss_clt")


# ----- Gemma Scope 2 ----------------------------------------------------------------------


def gemma_scope_2_clt_files(affine: bool, seed: int = 3) -> tuple[dict[str, bytes], list]:
    """The files of a Gemma Scope 2 CLT folder, as the repo lays them out: one
    params_layer_<n>.safetensors per layer (w_dec with a slot for every layer, those before
    n zero) and config.json; with `affine`, affine_skip_connection [d_in, d_out] per layer."""
    g = torch.Generator().manual_seed(seed)
    files: dict[str, bytes] = {}
    params = []
    for n in range(N):
        w_dec = torch.randn(M, N, D, generator=g)
        w_dec[:, :n] = 0
        p = {"w_enc": torch.randn(D, M, generator=g), "b_enc": torch.randn(M, generator=g) * 0.1,
             "b_dec": torch.randn(D, generator=g), "threshold": torch.rand(M, generator=g) * 0.3,
             "w_dec": w_dec}
        if affine:
            p["affine_skip_connection"] = torch.randn(D, D, generator=g)
        files[f"params_layer_{n}.safetensors"] = save(p)
        params.append(p)
    config = {
        "hf_hook_point_in": "model.layers.{all}.pre_feedforward_layernorm.output",
        "hf_hook_point_out": "model.layers.{all}.post_feedforward_layernorm.output",
        "width": N * M, "model_name": "google/gemma-3-270m-pt", "architecture": "jump_relu",
        "l0": 150, "affine_connection": affine, "type": "clt",
    }
    files["config.json"] = json.dumps(config).encode()
    return files, params


def by_hand(params: list[dict[str, torch.Tensor]], x: torch.Tensor) -> torch.Tensor:
    """Layer m's output: sum over n <= m of f_n @ w_dec_n[:, m] + b_dec_m (+ x_m @ A_m), with
    f_n = JumpReLU(x_n @ w_enc_n + b_enc_n)."""
    feats = [jumprelu(x[:, n] @ p["w_enc"] + p["b_enc"], p["threshold"])
             for n, p in enumerate(params)]
    outs = []
    for m, p in enumerate(params):
        y = p["b_dec"].expand(x.shape[0], D).clone()
        if "affine_skip_connection" in p:
            y = y + x[:, m] @ p["affine_skip_connection"]
        for n in range(m + 1):
            y = y + feats[n] @ params[n]["w_dec"][:, m]
        outs.append(y)
    return torch.stack(outs, dim=1)


def add_gemma_scope_2(hub_cache, folder: str, files: dict[str, bytes]) -> None:
    hub_cache.add(GS2_REPO, {f"{folder}/{name}": data for name, data in files.items()})


@pytest.mark.parametrize(("sae_id", "affine"), [
    ("width_262k_l0_medium_affine", True), ("width_262k_l0_big", False),
])
def test_gemma_scope_2_clts_load_from_the_hub_cache(hub_cache, offline, sae_id: str,
                                                    affine: bool) -> None:
    files, params = gemma_scope_2_clt_files(affine)
    add_gemma_scope_2(hub_cache, f"clt/{sae_id}", files)
    clt = SAE.from_pretrained("gemma-scope-2-270m-pt-clt", sae_id, cache_dir=hub_cache.dir)
    assert isinstance(clt, CrossLayerTranscoder)
    assert (clt.n_layers, clt.activation_fn, clt.has_skip) == (N, "jumprelu", affine)
    assert clt.cfg.metadata.model_name == "google/gemma-3-270m"  # the registry's model
    assert clt.cfg.metadata.extra["hook_names"][1] == "blocks.1.ln2.hook_normalized"
    x = torch.randn(7, N, D)
    torch.testing.assert_close(clt(x), by_hand(params, x), rtol=1e-5, atol=1e-5)


def test_an_affine_clt_reproduces_a_hand_computation(hub_cache, offline) -> None:
    """One token, one layer's every term written out: layer 1's output is layer 0's and
    layer 1's latents through their decoders into layer 1, b_dec_1 and x_1 @ A_1."""
    files, params = gemma_scope_2_clt_files(affine=True, seed=9)
    add_gemma_scope_2(hub_cache, "clt/width_262k_l0_medium_affine", files)
    clt = SAE.from_pretrained("gemma-scope-2-270m-pt-clt", "width_262k_l0_medium_affine",
                              cache_dir=hub_cache.dir)
    x = torch.randn(N, D)
    expected = params[1]["b_dec"].clone()
    for d_out in range(D):
        expected[d_out] += sum(x[1, d_in] * params[1]["affine_skip_connection"][d_in, d_out]
                               for d_in in range(D))
    for n in (0, 1):
        pre = x[n] @ params[n]["w_enc"] + params[n]["b_enc"]
        for latent in range(M):
            if pre[latent] > params[n]["threshold"][latent]:
                expected += pre[latent] * params[n]["w_dec"][latent, 1]
    torch.testing.assert_close(clt(x[None])[0, 1], expected, rtol=1e-5, atol=1e-5)


def test_mismatched_gemma_scope_2_clt_folders_are_refused(tmp_path: Path) -> None:
    def folder_with(name: str, files: dict[str, bytes]) -> Path:
        folder = tmp_path / name / "clt" / "width_262k_l0_medium_affine"
        folder.mkdir(parents=True)
        for file, data in files.items():
            (folder / file).write_bytes(data)
        return folder

    files, _ = gemma_scope_2_clt_files(affine=True)
    # A later layer without the skip connection.
    broken = dict(files)
    layer = load_file_bytes(files["params_layer_2.safetensors"])
    del layer["affine_skip_connection"]
    broken["params_layer_2.safetensors"] = save(layer)
    with pytest.raises(ValueError, match="lacks affine_skip_connection, unlike layer 0"):
        SAE.from_pretrained(str(folder_with("a", broken)))  # told by params_layer_0
    # config.json disagreeing with the weights.
    config = json.loads(files["config.json"])
    wrong = {**files, "config.json": json.dumps({**config, "affine_connection": False}).encode()}
    with pytest.raises(ValueError, match="affine_connection is False"):
        SAE.from_pretrained(str(folder_with("b", wrong)), layout="gemma_scope_2_clt")
    # A crosscoder's folder is not a CLT.
    cross = {**files, "config.json": json.dumps({**config, "type": "crosscoder"}).encode()}
    with pytest.raises(ValueError, match="type is 'crosscoder', not 'clt'"):
        SAE.from_pretrained(str(folder_with("c", cross)), layout="gemma_scope_2_clt")
    # A decoder with the wrong number of slots.
    layer = load_file_bytes(files["params_layer_0.safetensors"])
    layer["w_dec"] = layer["w_dec"][:, :2].contiguous()
    short = {**files, "params_layer_0.safetensors": save(layer)}
    with pytest.raises(ValueError, match=r"w_dec has shape \[10, 2, 6\], expected \[10, 3, 6\]"):
        SAE.from_pretrained(str(folder_with("d", short)), layout="gemma_scope_2_clt")


def load_file_bytes(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return dict(load(data))
