"""from_pretrained through huggingface_hub: an offline Hub cache, and a stand-in Hub endpoint
for downloads (revision, force_download, truncated files) and uploads (push_to_hub, CLI)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from saekit import SAE, SAEConfig
from saekit.cli import main as cli_main

GPT2_REPO = "jbloom/GPT2-Small-SAEs-Reformatted"
HOOK = "blocks.8.hook_resid_pre"


def small_sae(seed: int = 0, d_in: int = 768, d_sae: int = 32) -> SAE:
    torch.manual_seed(seed)
    cfg = SAEConfig(
        "standard", d_in=d_in, d_sae=d_sae, metadata={"model_name": "gpt2-small", "hook_name": HOOK}
    )
    sae = SAE.from_config(cfg)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    return sae


def saved_folder(tmp_path: Path, sae: SAE, name: str, sparsity: torch.Tensor | None = None) -> Path:
    return sae.save(tmp_path / name, sparsity=sparsity)


def test_registry_release_loads_offline_from_the_hub_cache(tmp_path, hub_cache, offline) -> None:
    sae = small_sae()
    sparsity = torch.linspace(-5, -1, 32)
    hub_cache.add_folder(GPT2_REPO, saved_folder(tmp_path, sae, "s", sparsity), HOOK)
    loaded = SAE.from_pretrained("gpt2-small-res-jb", HOOK, cache_dir=hub_cache.dir)
    sae_out, cfg_dict, sparsity_out = loaded  # the documented unpacking
    x = torch.randn(4, 768)
    torch.testing.assert_close(sae_out(x), sae(x))
    torch.testing.assert_close(sparsity_out, sparsity)
    assert cfg_dict["metadata"]["neuronpedia_id"] == "gpt2-small/8-res-jb"  # from the registry
    assert loaded.sae is sae_out


def test_from_pretrained_is_an_sae_that_also_unpacks(tmp_path, hub_cache, offline) -> None:
    """SAELens 6 returns the SAE; earlier code unpacks three values: both spellings work."""
    sae = small_sae()
    sparsity = torch.linspace(-5, -1, 32)
    hub_cache.add_folder(GPT2_REPO, saved_folder(tmp_path, sae, "s", sparsity), HOOK)
    loaded = SAE.from_pretrained("gpt2-small-res-jb", HOOK, cache_dir=hub_cache.dir)
    assert isinstance(loaded, SAE) and isinstance(loaded, type(sae))
    assert type(loaded).__name__ == type(sae).__name__
    x = torch.randn(4, 768)
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), sae(x))
    torch.testing.assert_close(loaded.sparsity, sparsity)
    triple = SAE.from_pretrained_with_cfg_and_sparsity(
        "gpt2-small-res-jb", HOOK, cache_dir=hub_cache.dir
    )
    again, cfg_dict, sparsity_again = triple
    assert isinstance(again, SAE) and triple.cfg_dict == cfg_dict == loaded.cfg_dict
    torch.testing.assert_close(sparsity_again, sparsity)
    # It saves and loads as any SAE.
    back = SAE.load(loaded.save(tmp_path / "again"))
    torch.testing.assert_close(back(x), sae(x))


def test_dtype_and_short_name(tmp_path, hub_cache, offline) -> None:
    sae = small_sae()
    hub_cache.add_folder(
        "jbloom/Gemma-2b-Residual-Stream-SAEs",
        saved_folder(tmp_path, sae, "s"),
        "gemma_2b_blocks.17.hook_resid_post_16384",
    )
    loaded = SAE.from_pretrained(
        "gemma-2b-res", "blocks.17.hook_resid_post", dtype="float64", cache_dir=hub_cache.dir
    )
    assert loaded.sae.W_enc.dtype == torch.float64
    assert loaded.cfg_dict["dtype"] == "float64"


def test_offline_with_nothing_cached_says_so(hub_cache, offline) -> None:
    with pytest.raises(FileNotFoundError, match="cannot be reached.*not in the Hub cache"):
        SAE.from_pretrained("gpt2-small-res-jb", HOOK, cache_dir=hub_cache.dir)
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        SAE.from_pretrained("someone/some-saes", "layer_3", cache_dir=hub_cache.dir)


def test_cli_reports_offline_error_in_one_line(hub_cache, offline, capsys, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache.dir))
    # No CLI subcommand loads weights yet; the library error is what the CLI would print.
    with pytest.raises(FileNotFoundError) as info:
        SAE.from_pretrained("gpt2-small-res-jb", HOOK)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("bad", ["../secrets", "/etc/passwd", "a/../../b"])
def test_escaping_sae_ids_are_rejected_before_any_path(bad: str, tmp_path) -> None:
    for release in ("gpt2-small-res-jb", "owner/repo", str(tmp_path)):
        with pytest.raises(ValueError, match="sae_id"):
            SAE.from_pretrained(release, bad)


def test_unknown_release_lists_close_names() -> None:
    with pytest.raises(ValueError, match="closest names: gpt2-small-res-jb"):
        SAE.from_pretrained("gpt2-small-res-jbb", HOOK)


def test_revision_and_force_download(tmp_path, fake_hub) -> None:
    first, second = small_sae(1, d_in=8), small_sae(2, d_in=8)
    files_1 = {
        f"layer0/{p.name}": p.read_bytes() for p in saved_folder(tmp_path, first, "a").iterdir()
    }
    files_2 = {
        f"layer0/{p.name}": p.read_bytes() for p in saved_folder(tmp_path, second, "b").iterdir()
    }
    sha_1 = fake_hub.add_commit("me/saes", files_1)
    fake_hub.add_commit("me/saes", files_2)
    cache = tmp_path / "cache"
    kwargs = {"endpoint": fake_hub.url, "cache_dir": cache}
    x = torch.randn(3, 8)
    latest = SAE.from_pretrained("me/saes", "layer0", **kwargs).sae
    pinned = SAE.from_pretrained("me/saes", "layer0", revision=sha_1, **kwargs).sae
    torch.testing.assert_close(latest(x), second(x))
    torch.testing.assert_close(pinned(x), first(x))

    weights = "/me/saes/resolve/main/layer0/sae_weights.safetensors"
    gets = lambda: sum(r.method == "GET" and r.path == weights for r in fake_hub.requests)  # noqa: E731
    before = gets()
    SAE.from_pretrained("me/saes", "layer0", **kwargs)
    assert gets() == before  # cached: no new download
    SAE.from_pretrained("me/saes", "layer0", force_download=True, **kwargs)
    assert gets() == before + 1


def test_truncated_download_is_fetched_again(tmp_path, fake_hub) -> None:
    sae = small_sae(3, d_in=8)
    files = {f"l/{p.name}": p.read_bytes() for p in saved_folder(tmp_path, sae, "a").iterdir()}
    fake_hub.add_commit("me/trunc", files)
    kwargs = {"endpoint": fake_hub.url, "cache_dir": tmp_path / "cache"}
    SAE.from_pretrained("me/trunc", "l", **kwargs)
    cached = next((tmp_path / "cache").rglob("l/sae_weights.safetensors")).resolve()
    cached.write_bytes(cached.read_bytes()[:100])  # an interrupted download
    x = torch.randn(2, 8)
    torch.testing.assert_close(SAE.from_pretrained("me/trunc", "l", **kwargs).sae(x), sae(x))


def test_truncated_cache_offline_says_how_to_fix(tmp_path, hub_cache, offline) -> None:
    folder = saved_folder(tmp_path, small_sae(), "s")
    snapshot = hub_cache.add_folder(GPT2_REPO, folder, HOOK)
    blob = (snapshot / HOOK / "sae_weights.safetensors").resolve()
    blob.write_bytes(blob.read_bytes()[:64])
    with pytest.raises(ValueError, match="corrupt.*force_download=True"):
        SAE.from_pretrained("gpt2-small-res-jb", HOOK, cache_dir=hub_cache.dir)


def test_a_hub_folder_at_odds_with_its_cfg_fails_from_the_headers(
    tmp_path, hub_cache, offline
) -> None:
    """The Hub path reads a native folder as SAE.load does: each file is fetched, then its
    header checked against cfg.json, and errors name the file in the repo."""
    folder = saved_folder(tmp_path, small_sae(), "s", torch.zeros(32))
    raw = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**raw, "d_sae": 10**12}))
    hub_cache.add_folder("me/huge", folder, "l")
    with pytest.raises(ValueError, match=r"'W_enc' in me/huge/l/sae_weights\.safetensors has"):
        SAE.from_pretrained("me/huge", "l", cache_dir=hub_cache.dir)
    (folder / "cfg.json").write_text(json.dumps(raw))
    save_file({"sparsity": torch.zeros(31)}, str(folder / "sparsity.safetensors"))
    hub_cache.add_folder("me/short", folder, "l")
    with pytest.raises(ValueError, match=r"me/short/l/sparsity\.safetensors: 'sparsity' has sh"):
        SAE.from_pretrained("me/short", "l", cache_dir=hub_cache.dir)


def test_push_to_hub_round_trip_and_model_card(tmp_path, fake_hub) -> None:
    sae = small_sae(4, d_in=8)
    token = "hf_NotARealTokenButSecret123"
    url = sae.push_to_hub(
        "me/pushed", sae_id="blocks.8", token=token, endpoint=fake_hub.url, metrics={"l0": 12.5}
    )
    assert url.startswith(f"{fake_hub.url}/me/pushed/commit/")
    files = fake_hub.repos["me/pushed"].commits[-1][1]
    assert {"README.md", "blocks.8/cfg.json", "blocks.8/sae_weights.safetensors"} <= set(files)
    assert all(token.encode() not in data for data in files.values())
    sent = [{k.lower(): v for k, v in r.headers.items()} for r in fake_hub.requests]
    assert any(h.get("authorization") == f"Bearer {token}" for h in sent)
    card = files["blocks.8/README.md"].decode()
    assert "library_name: saekit" in card and "| d_sae (width) | 32 |" in card
    assert f"| hook | {HOOK} |" in card and "| l0 | 12.5 |" in card
    assert "SAE.from_pretrained(\"me/pushed\", sae_id='blocks.8')" in card
    x = torch.randn(2, 8)
    back = SAE.from_pretrained("me/pushed", "blocks.8", endpoint=fake_hub.url, cache_dir=tmp_path)
    torch.testing.assert_close(back.sae(x), sae(x))
    # A second SAE in the same repo keeps the first's root card.
    small_sae(5, d_in=8).push_to_hub("me/pushed", sae_id="blocks.9", endpoint=fake_hub.url)
    latest = fake_hub.repos["me/pushed"].commits[-1][1]
    assert latest["README.md"] == files["README.md"] and "blocks.9/cfg.json" in latest


def test_cli_upload(tmp_path, fake_hub, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)  # read when the parser is built
    run_dir = tmp_path / "run"
    saved_folder(run_dir, small_sae(6, d_in=8), "final")
    (run_dir / "metrics.json").write_text(
        json.dumps({"explained_variance": 0.81, "l0": {"mean": 7}})
    )
    assert cli_main(["upload", str(run_dir), "me/from-cli", "--sae-id", "layer_0"]) == 0
    files = fake_hub.repos["me/from-cli"].commits[-1][1]
    assert "layer_0/sae_weights.safetensors" in files
    assert "| explained_variance | 0.81 |" in files["layer_0/README.md"].decode()
    assert "| l0/mean | 7 |" in files["layer_0/README.md"].decode()
    captured = capsys.readouterr()
    assert "me/from-cli" in captured.out
    assert re.search(r"uploading \S+ to me/from-cli/layer_0: \d+\.\d s", captured.err)


def test_cli_upload_without_an_sae_says_what_it_needs(tmp_path, capsys) -> None:
    assert cli_main(["upload", str(tmp_path), "me/x"]) == 2
    assert "holds no saved SAE" in capsys.readouterr().err


def test_cli_pretrained_list_and_show(capsys) -> None:
    assert cli_main(["pretrained", "list", "--model", "gpt2-small", "--search", "res-jb"]) == 0
    out = capsys.readouterr().out
    assert "gpt2-small-res-jb" in out and "jbloom/GPT2-Small-SAEs-Reformatted" in out
    assert "gemma" not in out
    assert cli_main(["pretrained", "show", "gemma-2b-res"]) == 0
    out = capsys.readouterr().out
    assert "gemma-2b-res-jb" in out and "blocks.12.hook_resid_post" in out and "0.213819" in out
    assert cli_main(["pretrained", "show", "gemma-2b-rse"]) == 2
    assert "closest names" in capsys.readouterr().err
