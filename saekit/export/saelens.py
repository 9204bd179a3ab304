"""`export_saelens`: the SAELens folder layout, which is saekit's own (`SAE.save`).

SAELens loads the folder with `SAE.load_from_disk(path)`: cfg.json (the current layout,
architecture and metadata) and sae_weights.safetensors with the native tensor names.
"""

from __future__ import annotations

from pathlib import Path

from saekit.export.folder import check_export_folder
from saekit.saes.base import SAE


def export_saelens(sae: SAE, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write `sae` as `sae.save(out)` does; returns the folder. A folder that holds files is
    refused unless `overwrite`."""
    folder = check_export_folder(out, overwrite)
    return sae.save(folder)
