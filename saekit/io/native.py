"""The native SAE folder: cfg.json + sae_weights.safetensors (+ sparsity.safetensors).

Writes are atomic: a new folder is assembled under a temporary name and renamed into place; an
existing folder (which may hold other files, such as a training run's checkpoints) gets each
file replaced by rename, with cfg.json removed first and written last, so an interrupted save
leaves either the old SAE or a folder without cfg.json, never a mix that loads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from saekit.config import SAEConfig
from saekit.io.cfg_layout import config_from_dict

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
#: Tensors older releases store that fold into W_dec (finetuned decoder scales).
_DECODER_SCALE_TENSORS = ("scaling_factor", "finetuning_scaling_factor")


class SAEFolder(NamedTuple):
    """What a native folder holds, read and checked; `SAE.load` builds the SAE from it."""

    cfg: SAEConfig
    tensors: dict[str, Tensor]
    sparsity: Tensor | None
    cfg_dict: dict[str, Any]
    """cfg.json as written, in whichever layout."""
    weights_path: Path


def save_sae_folder(
    path: str | Path,
    cfg_dict: dict[str, Any],
    tensors: dict[str, Tensor],
    sparsity: Tensor | None = None,
) -> Path:
    """Write a native SAE folder atomically; returns its path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a folder; choose a folder path")
    files: dict[str, Any] = {
        WEIGHTS_FILE: {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
        CFG_FILE: cfg_dict,
    }
    if sparsity is not None:
        files[SPARSITY_FILE] = {"sparsity": sparsity.detach().contiguous().cpu()}
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            for name, content in files.items():
                _write(staging / name, name, content)
            os.replace(staging, path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return path
    return _replace_in_place(path, files)


def _replace_in_place(path: Path, files: dict[str, Any]) -> Path:
    staged: dict[str, Path] = {}
    try:
        for name, content in files.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=path)
            os.close(fd)
            staged[name] = Path(tmp)
            _write(staged[name], name, content)
    except BaseException:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        raise
    (path / CFG_FILE).unlink(missing_ok=True)
    if SPARSITY_FILE not in files:
        (path / SPARSITY_FILE).unlink(missing_ok=True)  # stale statistics of the old weights
    for name, tmp in staged.items():
        if name != CFG_FILE:
            os.replace(tmp, path / name)
    os.replace(staged[CFG_FILE], path / CFG_FILE)
    return path


def _write(target: Path, name: str, content: Any) -> None:
    """Write one file of the folder (`name` says which) and flush it to disk."""
    if name.endswith(".safetensors"):
        save_file(content, str(target))
    else:
        target.write_text(json.dumps(content, indent=2) + "\n")
    with open(target, "rb") as handle:
        os.fsync(handle.fileno())


def read_cfg_json(folder: Path) -> dict[str, Any]:
    cfg_path = folder / CFG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"{cfg_path} not found: an SAE folder needs {CFG_FILE} and {WEIGHTS_FILE}"
        )
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{cfg_path} is not valid JSON ({err}); the file may be corrupt") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_path} must hold a JSON object, found {type(raw).__name__}")
    return raw


def read_safetensors(file: Path) -> dict[str, Tensor]:
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{file} could not be read as safetensors ({err}); is it corrupt?"
        ) from err


def fold_decoder_scales(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Older releases carry a per-latent decoder scale; fold it into W_dec."""
    tensors = dict(tensors)
    for name in _DECODER_SCALE_TENSORS:
        scale = tensors.pop(name, None)
        if scale is not None and "W_dec" in tensors:
            tensors["W_dec"] = tensors["W_dec"] * scale.to(tensors["W_dec"].dtype)[:, None]
    return tensors


def read_sae_folder(path: str | Path) -> SAEFolder:
    """Read a native folder (either cfg.json layout); errors name the file and what is wrong."""
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"SAE folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(
            f"{folder} is not a folder; SAE.load expects a folder holding {CFG_FILE} and "
            f"{WEIGHTS_FILE}"
        )
    raw = read_cfg_json(folder)
    cfg = config_from_dict(raw, source=str(folder / CFG_FILE))
    weights_path = folder / WEIGHTS_FILE
    tensors = fold_decoder_scales(read_safetensors(weights_path))
    sparsity = None
    if (folder / SPARSITY_FILE).is_file():
        sparsity_tensors = read_safetensors(folder / SPARSITY_FILE)
        if "sparsity" not in sparsity_tensors:
            raise ValueError(
                f"{folder / SPARSITY_FILE} has no 'sparsity' tensor "
                f"(found {sorted(sparsity_tensors)})"
            )
        sparsity = sparsity_tensors["sparsity"]
    return SAEFolder(cfg, tensors, sparsity, raw, weights_path)
