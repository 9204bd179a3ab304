"""Every layout in saekit's release registry has a converter, and each new one loads its
fixture (a tiny copy of the published repo, tests/fixtures/published_layouts) through the
registry into an SAE that computes the layout's published formula, written out here on the
raw files, independently of the converters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from saekit import SAE
from saekit.io import releases
from saekit.io.converters import LAYOUTS

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "published_layouts"
GEN = torch.Generator().manual_seed(3)


def case(layout: str) -> dict[str, Any]:
    return json.loads((FIXTURES / layout / "case.json").read_text())


def load(layout: str, hub_cache, monkeypatch, **options: Any) -> SAE:
    """The fixture's SAE, fetched offline from a Hub cache holding the fixture's repo, by
    the registry release it stands in for (registered here when it is not a real one)."""
    info = case(layout)
    hub_cache.add_folder(info["repo_id"], FIXTURES / layout / "repo", "")
    monkeypatch.setattr(releases, "_EXTRA", {})
    if releases.resolve_release_name(info["release"]) is None:
        entry = {"id": info["sae_id"], "path": info["path"]}
        releases.register_release(
            info["release"],
            {"model": info["model"], "repo_id": info["repo_id"], "layout": layout,
             "saes": [entry]},
        )
    return SAE.from_pretrained(
        info["release"], info["sae_id"], cache_dir=hub_cache.dir, dtype="float32", **options
    ).sae


def torch_file(layout: str, name: str) -> dict[str, Tensor]:
    stored = torch.load(FIXTURES / layout / "repo" / name, weights_only=True)
    return {k: v.float() for k, v in stored.items()}


def x_in(d_in: int, rows: int = 7) -> Tensor:
    return torch.randn(rows, d_in, generator=GEN) * 2


# ----- the registry is covered ---------------------------------------------------------------


def test_every_registry_layout_has_a_converter() -> None:
    used = {release.layout for release in releases.all_releases().values()}
    missing = sorted(used - set(LAYOUTS))
    assert not missing, f"registry layouts without a converter: {missing}"


def test_every_new_layout_has_a_fixture_and_a_test() -> None:
    tested = {
        "qwen_scope", "goodfire", "deepseek_r1", "connor_rob_hook_z", "mwhanna_transcoder",
        "mntss_clt_layer_transcoder", "temporal",
    }
    older = {  # tested in test_pretrained_converters.py on files written there
        "native", "gemma_scope", "gemma_scope_transcoder", "gemma_scope_2", "llama_scope",
        "llama_scope_r1_distill", "dictionary_learning", "sparsify",
    }
    # Whole cross-layer transcoders: tests/test_clt_circuit_tracer.py writes their folders.
    clts = {"mntss_clt", "gemma_scope_2_clt"}
    assert set(LAYOUTS) == tested | older | clts
    for layout in tested:
        assert (FIXTURES / layout / "case.json").is_file(), layout


# ----- one test per layout -------------------------------------------------------------------


def test_qwen_scope(hub_cache, monkeypatch, offline) -> None:
    sae = load("qwen_scope", hub_cache, monkeypatch)
    raw = torch_file("qwen_scope", "layer3.sae.pt")
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.d_sae) == ("topk", 8, 1024)  # W1K, L0_8
    assert sae.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    x = x_in(4)
    pre = x @ raw["W_enc"].T + raw["b_enc"]  # no centring
    top = pre.topk(8, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    torch.testing.assert_close(sae.encode(x), f)
    torch.testing.assert_close(sae.decode(f), f @ raw["W_dec"].T + raw["b_dec"])


def test_qwen_scope_refuses_a_file_wider_than_its_repo_name(
    hub_cache, monkeypatch, offline, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    raw = torch_file("qwen_scope", "layer3.sae.pt")
    torch.save({k: v[:512] if k in ("W_enc", "b_enc") else v for k, v in raw.items()},
               repo / "layer3.sae.pt")
    hub_cache.add_folder("Qwen/SAE-Res-Tiny-Base-W1K-L0_8", repo, "")
    monkeypatch.setattr(releases, "_EXTRA", {})
    releases.register_release("qwen-bad", {
        "model": "m", "repo_id": "Qwen/SAE-Res-Tiny-Base-W1K-L0_8", "layout": "qwen_scope",
        "saes": [{"id": "layer3", "path": "layer3.sae.pt"}]})
    with pytest.raises(ValueError, match="512 latents but the repo name says W1K"):
        SAE.from_pretrained("qwen-bad", "layer3", cache_dir=hub_cache.dir)


@pytest.mark.parametrize(
    ("layout", "file", "encoder", "decoder"),
    [
        ("goodfire", "Llama-3.1-8B-Instruct-SAE-l19.pth", "encoder_linear", "decoder_linear"),
        ("deepseek_r1", "DeepSeek-R1-Distill-Llama-8B-SAE-l19.pt", "encoder", "decoder"),
    ],
)
def test_llama_linear_relu_saes(
    layout: str, file: str, encoder: str, decoder: str, hub_cache, monkeypatch, offline
) -> None:
    sae = load(layout, hub_cache, monkeypatch)
    raw = torch_file(layout, file)
    assert sae.cfg.architecture == "standard"
    assert sae.cfg.metadata.hook_name == "blocks.19.hook_resid_post"
    assert sae.cfg.metadata.dataset_path == "lmsys/lmsys-chat-1m"
    x = x_in(4)
    f = torch.relu(x @ raw[f"{encoder}.weight"].T + raw[f"{encoder}.bias"])
    torch.testing.assert_close(sae.encode(x), f)
    torch.testing.assert_close(sae(x), f @ raw[f"{decoder}.weight"].T + raw[f"{decoder}.bias"])


def test_deepseek_r1_keeps_its_bfloat16_by_default(hub_cache, monkeypatch, offline) -> None:
    info = case("deepseek_r1")
    hub_cache.add_folder(info["repo_id"], FIXTURES / "deepseek_r1" / "repo", "")
    sae = SAE.from_pretrained(info["release"], info["sae_id"], cache_dir=hub_cache.dir).sae
    assert sae.dtype == torch.bfloat16


def test_connor_rob_hook_z(hub_cache, monkeypatch, offline) -> None:
    info = case("connor_rob_hook_z")
    sae = load("connor_rob_hook_z", hub_cache, monkeypatch)
    name = json.loads(
        next((FIXTURES / "connor_rob_hook_z" / "repo").glob("*_cfg.json")).read_text()
    )["name"]
    raw = torch_file("connor_rob_hook_z", f"{name}.pt")
    assert sae.cfg.metadata.hook_name == "blocks.0.attn.hook_z"
    z = torch.randn(5, info["n_heads"], info["d_head"], generator=GEN)  # [pos, heads, d_head]
    flat = z.flatten(-2)
    f = torch.relu((flat - raw["b_dec"]) @ raw["W_enc"] + raw["b_enc"])
    torch.testing.assert_close(sae.encode(z), f)
    torch.testing.assert_close(sae(z), (f @ raw["W_dec"] + raw["b_dec"]).unflatten(-1, z.shape[1:]))


def test_mwhanna_transcoder(hub_cache, monkeypatch, offline) -> None:
    sae = load("mwhanna_transcoder", hub_cache, monkeypatch)
    raw = load_file(str(FIXTURES / "mwhanna_transcoder/repo/layer_2.safetensors"))
    assert sae.cfg.architecture == "transcoder"
    assert sae.cfg.metadata.model_name == "Qwen/Qwen3-0.6B"
    assert sae.cfg.metadata.hook_name == "blocks.2.ln2.hook_normalized"
    assert sae.cfg.metadata.hook_name_out == "blocks.2.hook_mlp_out"
    x = x_in(4)
    f = torch.relu(x @ raw["W_enc"].T + raw["b_enc"])  # W_enc is stored [d_sae, d_in]
    torch.testing.assert_close(sae.encode(x), f)
    torch.testing.assert_close(sae(x), f @ raw["W_dec"] + raw["b_dec"])


def test_mwhanna_transcoder_with_a_skip_path(
    hub_cache, monkeypatch, offline, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    for item in (FIXTURES / "mwhanna_transcoder/repo").iterdir():
        (repo / item.name).write_bytes(item.read_bytes())
    raw = load_file(str(repo / "layer_2.safetensors"))
    raw["W_skip"] = torch.randn(4, 4, generator=GEN)
    save_file(raw, str(repo / "layer_2.safetensors"))
    hub_cache.add_folder("mwhanna/qwen3-0.6b-transcoders-lowl0", repo, "")
    sae = SAE.from_pretrained(
        "mwhanna-qwen3-0.6b-transcoders-lowl0", "layer_2", cache_dir=hub_cache.dir
    ).sae
    assert sae.cfg.architecture == "skip_transcoder"
    x = x_in(4)
    f = torch.relu(x @ raw["W_enc"].T + raw["b_enc"])
    torch.testing.assert_close(sae(x), f @ raw["W_dec"] + raw["b_dec"] + x @ raw["W_skip"].T)


def _clt_files() -> tuple[list[dict[str, Tensor]], list[Tensor]]:
    repo = FIXTURES / "mntss_clt_layer_transcoder/repo"
    enc = [load_file(str(repo / f"W_enc_{n}.safetensors")) for n in range(3)]
    dec = [load_file(str(repo / f"W_dec_{n}.safetensors"))[f"W_dec_{n}"] for n in range(3)]
    return enc, dec


def test_mntss_clt_layer_loads_its_encoder_and_same_layer_decoder(
    hub_cache, monkeypatch, offline
) -> None:
    sae = load("mntss_clt_layer_transcoder", hub_cache, monkeypatch)
    enc, dec = _clt_files()
    assert sae.cfg.architecture == "transcoder"
    assert sae.cfg.metadata.hook_name == "blocks.1.hook_resid_mid"
    assert sae.cfg.metadata.hook_name_out == "blocks.1.hook_mlp_out"
    assert sae.cfg.metadata.extra["clt_decoders_left_out"] == 1
    # The CLT on two layers' inputs (circuit-tracer's formula): features per source layer,
    # and the output at layer 1 sums the writes of layers 0 and 1.
    x0, x1 = x_in(4), x_in(4)
    f0 = torch.relu(x0 @ enc[0]["W_enc_0"].T + enc[0]["b_enc_0"])
    f1 = torch.relu(x1 @ enc[1]["W_enc_1"].T + enc[1]["b_enc_1"])
    clt_out_1 = f0 @ dec[0][:, 1] + f1 @ dec[1][:, 0] + enc[1]["b_dec_1"]
    torch.testing.assert_close(sae.encode(x1), f1)  # the CLT's own latents, exactly
    # What layer 1's latents write to layer 1; adding layer 0's write gives the CLT's output.
    torch.testing.assert_close(sae(x1), f1 @ dec[1][:, 0] + enc[1]["b_dec_1"])
    torch.testing.assert_close(sae(x1) + f0 @ dec[0][:, 1], clt_out_1)


def test_mntss_clt_layer_with_thresholds_is_jumprelu(
    hub_cache, monkeypatch, offline, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    for item in (FIXTURES / "mntss_clt_layer_transcoder/repo").iterdir():
        (repo / item.name).write_bytes(item.read_bytes())
    enc = load_file(str(repo / "W_enc_2.safetensors"))
    enc["threshold_2"] = torch.rand(8, generator=GEN)
    save_file(enc, str(repo / "W_enc_2.safetensors"))
    hub_cache.add_folder("mntss/clt-gemma-2-2b-2.5M", repo, "")
    sae = SAE.from_pretrained(
        "mntss-gemma-2-2b-2.5m-clt-as-per-layer", "layer_2", cache_dir=hub_cache.dir
    ).sae
    assert sae.cfg.architecture == "jumprelu_transcoder"
    x = x_in(4)
    pre = x @ enc["W_enc_2"].T + enc["b_enc_2"]
    torch.testing.assert_close(sae.encode(x), pre * (pre > enc["threshold_2"]))


def test_temporal_sae_is_refused_with_the_reason(hub_cache, monkeypatch, offline) -> None:
    with pytest.raises(ValueError, match="temporal SAE: 1 attention layer.*cannot load it yet"):
        load("temporal", hub_cache, monkeypatch)


def test_gemma_scope_2_affine_transcoder(hub_cache, monkeypatch, offline) -> None:
    sae = load("gemma_scope_2_affine", hub_cache, monkeypatch)
    folder = FIXTURES / "gemma_scope_2_affine/repo/transcoder/layer_13_width_16k_l0_big_affine"
    raw = load_file(str(folder / "params.safetensors"))
    assert sae.cfg.architecture == "jumprelu_skip_transcoder"
    assert sae.cfg.metadata.hook_name_out == "blocks.13.hook_mlp_out"
    x = x_in(4)
    pre = x @ raw["w_enc"] + raw["b_enc"]
    f = pre * (pre > raw["threshold"])
    torch.testing.assert_close(sae.encode(x), f)
    expected = f @ raw["w_dec"] + raw["b_dec"] + x @ raw["affine_skip_connection"]
    torch.testing.assert_close(sae(x), expected)


def test_gemma_scope_2_folder_and_weights_must_agree(tmp_path: Path) -> None:
    folder = tmp_path / "transcoder/layer_1_width_16k_l0_big_affine"
    folder.mkdir(parents=True)
    src = FIXTURES / "gemma_scope_2_affine/repo/transcoder/layer_13_width_16k_l0_big_affine"
    raw = load_file(str(src / "params.safetensors"))
    del raw["affine_skip_connection"]
    save_file(raw, str(folder / "params.safetensors"))
    with pytest.raises(ValueError, match="folder name says an affine skip connection"):
        SAE.from_pretrained(str(tmp_path), "transcoder/layer_1_width_16k_l0_big_affine")


# ----- sparsify group-max ------------------------------------------------------------------


def _groupmax_reference(x: Tensor, raw: dict[str, Tensor], k: int) -> Tensor:
    """sparsify's encoder: ReLU(W (x - b_dec) + b), then each of k contiguous groups keeps its
    maximum."""
    pre = torch.relu((x - raw["b_dec"]) @ raw["encoder.weight"].T + raw["encoder.bias"])
    values, within = pre.unflatten(-1, (k, -1)).max(dim=-1)
    index = within + torch.arange(k) * (pre.shape[-1] // k)
    return torch.zeros_like(pre).scatter(-1, index, values)


def test_sparsify_groupmax_matches_sparsify_and_not_topk() -> None:
    folder = FIXTURES / "sparsify_groupmax/repo"
    raw = load_file(str(folder / "layers.3/sae.safetensors"))
    sae = SAE.from_pretrained(str(folder), "layers.3").sae
    assert (sae.cfg.architecture, sae.cfg.k) == ("groupmax", 3)
    x = x_in(4, rows=64)
    f = _groupmax_reference(x, raw, 3)
    torch.testing.assert_close(sae.encode(x), f)
    torch.testing.assert_close(sae(x), f @ raw["W_dec"] + raw["b_dec"])
    topk = SAE.from_tensors(sae.cfg.replace(architecture="topk"), dict(sae.state_dict()))
    assert (topk.encode(x) - f).abs().max() > 0.1  # what loading it as topk used to give


def _sparsify_copy(tmp_path: Path, **changes: Any) -> Path:
    src = FIXTURES / "sparsify_groupmax/repo/layers.3"
    dst = tmp_path / "layers.3"
    dst.mkdir()
    (dst / "sae.safetensors").write_bytes((src / "sae.safetensors").read_bytes())
    cfg = {**json.loads((src / "cfg.json").read_text()), **changes}
    (dst / "cfg.json").write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"activation": "relu"}, "activation 'relu' is not one saekit knows"),
        ({"jumprelu_threshold": 0.1}, r"field\(s\) \['jumprelu_threshold'\] that saekit"),
        ({"signed": True}, "signed sparse coders"),
        ({"num_latents": 24}, "do not match the weights"),
        ({"k": 5}, "not a multiple of 5"),
    ],
)
def test_sparsify_config_it_cannot_honour_is_an_error(
    tmp_path: Path, changes: dict, message: str
) -> None:
    root = _sparsify_copy(tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        SAE.from_pretrained(str(root), "layers.3")


def test_groupmax_architecture_math() -> None:
    sae = SAE.create("groupmax", 3, 6, k=2)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(3).repeat(1, 2))  # latent i reads coordinate i % 3
    x = torch.tensor([[1.0, 3.0, 2.0], [-1.0, -2.0, 0.5]])
    # Groups {0,1,2} and {3,4,5} see the same scores [1, 3, 2] / [0, 0, 0.5] (after ReLU).
    expected = torch.tensor([[0, 3, 0, 0, 3, 0], [0, 0, 0.5, 0, 0, 0.5]])
    torch.testing.assert_close(sae.encode(x), expected)
    out = sae.training_forward(torch.randn(16, 3))
    assert (out.fire_counts() <= 16).all() and ((out.latents != 0).sum(-1) <= 2).all()
    with pytest.raises(ValueError, match="not a multiple"):
        SAE.create("groupmax", 3, 7, k=2)
    assert SAE.create("groupmax", 3, 6).cfg.k == 6  # the default k divides d_sae

