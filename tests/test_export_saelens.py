"""`saekit export saelens`: the folder is exactly what `sae.save` writes (SAELens's layout)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sae_factory import random_sae

from saekit.cli import main
from saekit.errors import SaekitError
from saekit.export import export_saelens


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("architecture", ["jumprelu", "skip_transcoder"])
def test_export_is_what_save_writes(architecture: str, tmp_path) -> None:
    sae = random_sae(architecture)
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_pre"
    sae.save(tmp_path / "saved")
    export_saelens(sae, tmp_path / "exported")
    assert files(tmp_path / "exported") == files(tmp_path / "saved")


def test_cli_export_is_what_save_writes(tmp_path, capsys) -> None:
    sae = random_sae("topk", k=4)
    sae.save(tmp_path / "saved")
    code = main(["export", "saelens", str(tmp_path / "saved"), "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    assert files(tmp_path / "out") == files(tmp_path / "saved")
    code = main(["export", "saelens", str(tmp_path / "saved"), "--out", str(tmp_path / "out")])
    assert code == 2 and "already holds files" in capsys.readouterr().err
    with pytest.raises(SaekitError, match="already holds files"):
        export_saelens(sae, tmp_path / "out")
    assert export_saelens(sae, tmp_path / "out", overwrite=True) == tmp_path / "out"
