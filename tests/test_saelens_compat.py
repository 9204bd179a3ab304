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
