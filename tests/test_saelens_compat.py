"""Folders written by the real sae-lens package load in saekit and compute what sae-lens
computed. The fixtures (tests/fixtures/saelens/, made by make_fixtures.py there with sae-lens
installed in a throw-away environment) hold each saved folder and sae-lens's own outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saekit import SAE

FIXTURES = Path(__file__).parent / "fixtures" / "saelens"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "io.safetensors").is_file())


def _expected(case: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / case / "io.safetensors"))


@pytest.mark.parametrize("case", CASES)
def test_saelens_folder_gives_saelens_outputs(case: str) -> None:
    sae = SAE.load(FIXTURES / case / "sae")
    io = _expected(case)
    for suffix in ("", "_3d"):
        if f"x{suffix}" not in io:
            continue
        x = io[f"x{suffix}"]
        features = sae.encode(x)
        assert torch.allclose(features, io[f"features{suffix}"], atol=1e-5), "features"
        if f"recon{suffix}" in io:
            recon = sae.decode(features)
            assert torch.allclose(recon, io[f"recon{suffix}"], atol=1e-5), "recon"
        if f"out{suffix}" in io:
            assert torch.allclose(sae(x), io[f"out{suffix}"], atol=1e-5), "out"


WRITTEN = Path(__file__).parent / "fixtures" / "saekit_written"
WRITTEN_CASES = sorted(p.name for p in WRITTEN.iterdir() if (p / "io.safetensors").is_file())


@pytest.mark.parametrize("case", WRITTEN_CASES)
def test_saekit_folder_loads_in_saelens_with_same_outputs(case: str, tmp_path: Path) -> None:
    """sae-lens loaded this saekit-written folder and recorded its outputs; saekit agrees."""
    folder = WRITTEN / case / "sae"
    sae = SAE.load(folder)
    io = load_file(str(WRITTEN / case / "io.safetensors"))
    features = sae.encode(io["x"])
    assert torch.allclose(features, io["features"], atol=1e-5)
    assert torch.allclose(sae.decode(features), io["recon"], atol=1e-5)
    assert torch.allclose(sae(io["x"]), io["out"], atol=1e-5)
    # saekit still writes the same folder today, so what sae-lens read is what we write.
    sae.save(tmp_path / "again")
    assert (tmp_path / "again" / "cfg.json").read_text() == (folder / "cfg.json").read_text()


def test_saelens_spellings_of_save_load_and_reshaping(tmp_path: Path) -> None:
    """save_model / load_from_disk / fold_W_dec_norm / hook_z reshaping / W_enc etc., as
    SAELens names them."""
    torch.manual_seed(0)
    sae = SAE.create("standard", d_in=8, d_sae=16,
                     metadata={"hook_name": "blocks.0.attn.hook_z", "seqpos_slice": [None]})
    assert (sae.W_enc.shape, sae.W_dec.shape) == ((8, 16), (16, 8))
    assert (sae.b_enc.shape, sae.b_dec.shape) == ((16,), (8,))
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, 16)[:, None])
    weights_path, cfg_path = sae.save_model(tmp_path / "sae")
    assert weights_path.name == "sae_weights.safetensors" and cfg_path.name == "cfg.json"
    x = torch.randn(5, 8)
    again = SAE.load_from_disk(tmp_path / "sae", device="cpu")
    assert torch.equal(again(x), sae(x))
    folded = SAE.load_from_disk(tmp_path / "sae", fold_W_dec_norm=True)
    torch.testing.assert_close(folded.W_dec.norm(dim=1), torch.ones(16))
    torch.testing.assert_close(folded(x), sae(x), atol=1e-5, rtol=1e-5)
    # SAELens's metadata fields by name, other keys as attributes, None when absent.
    meta = again.cfg.metadata
    assert meta.hook_name == meta["hook_name"] == "blocks.0.attn.hook_z"
    assert meta.seqpos_slice == [None] and meta.model_from_pretrained_kwargs is None
    # hook_z reshaping: per-head input [..., n_heads, d_head] in and out.
    heads = torch.randn(5, 2, 4)
    again.turn_on_forward_pass_hook_z_reshaping()
    assert again.cfg.reshape_activations == "hook_z"
    torch.testing.assert_close(again(heads), sae(heads.flatten(-2)).unflatten(-1, (2, 4)))
    again.turn_off_forward_pass_hook_z_reshaping()
    assert again(x).shape == x.shape
    resid = SAE.create("standard", 8, 16, metadata={"hook_name": "blocks.0.hook_resid_pre"})
    with pytest.raises(ValueError, match="hook_z"):
        resid.turn_on_forward_pass_hook_z_reshaping()
