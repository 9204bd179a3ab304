"""The native SAE folder: cfg.json + sae_weights.safetensors (+ sparsity.safetensors).

Writes are atomic: a new folder is assembled under a temporary name and renamed into place; an
existing folder (which may hold other files, such as a training run's checkpoints) gets each
file replaced by rename, with cfg.json removed first and written last, so an interrupted save
leaves either the old SAE or a folder without cfg.json, never a mix that loads.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from saekit.config import SAEConfig
from saekit.errors import disk_full_error
from saekit.finite import NonFiniteWeights
from saekit.io.cfg_layout import apply_overrides, config_from_dict
from saekit.io.headers import TensorHeader, safetensors_header
from saekit.io.sources import FileSource, LocalSource, join

log = logging.getLogger(__name__)

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
#: Tensors older releases store that fold into W_dec (finetuned decoder scales).
_DECODER_SCALE_TENSORS = ("scaling_factor", "finetuning_scaling_factor")


class SAEFolder(NamedTuple):
    """What a native folder holds, read and checked; `SAE.load` and `SAE.from_pretrained`
    build the SAE from it."""

    cfg: SAEConfig
    tensors: dict[str, Tensor]
    sparsity: Tensor | None
    cfg_dict: dict[str, Any]
    """cfg.json as written, in whichever layout (without the registry's overrides)."""
    weights_path: Path
    """The weights file on this machine (in the Hub cache for a Hub repo)."""


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
    needed = sum(t.numel() * t.element_size() for f in files.values() for t in _tensors(f))
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_partial_writes(path.parent, path.name)
        staging = make_staging_dir(path.parent, f".{path.name}.")
        try:
            for name, content in files.items():
                _write(staging / name, name, content)
            os.replace(staging, path)
        except BaseException as err:
            shutil.rmtree(staging, ignore_errors=True)
            full = disk_full_error(err, "SAE", path, needed, "nothing was written")
            if full is not None:
                raise full from err
            raise
        return path
    return _replace_in_place(path, files, needed)


def _tensors(content: Any) -> list[Tensor]:
    return list(content.values()) if isinstance(content, dict) and all(
        isinstance(v, Tensor) for v in content.values()
    ) else []


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux);
    elsewhere set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_staging_dir(parent: Path, prefix: str) -> Path:
    """A new, empty folder `parent/<prefix><8 hex digits>` for assembling a write.

    Created with the default mode, so the umask applies (tempfile.mkdtemp would make it
    0700, and the renamed result private to its owner whatever the user's umask)."""
    while True:
        candidate = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


def staging_file(folder: Path, prefix: str) -> Path:
    """A free name `folder/<prefix><8 hex digits>` for a file to be written and renamed;
    the writer creates it, with the default mode (so the umask applies)."""
    while True:
        candidate = folder / f"{prefix}{secrets.token_hex(4)}"
        if not candidate.exists():
            return candidate


#: Temporary names an interrupted save leaves: `.cfg.json.<8 chars>` and the like beside
#: the files of an existing folder, and `.<folder name>.<8 chars>/` beside a new folder.
_PARTIAL_FILE = re.compile(
    r"^\.(?:cfg\.json|sae_weights\.safetensors|sparsity\.safetensors)\.[A-Za-z0-9_]{8}$"
)


def remove_partial_writes(folder: Path, new_folder: str | None = None) -> list[Path]:
    """Remove what an interrupted save (a kill mid-write) left in `folder`: temporary files
    of an SAE folder's in-place replacement and, with `new_folder`, the half-assembled
    staging folders of that name (holding nothing but an SAE folder's files). Returns
    what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    staging = re.compile(rf"^\.{re.escape(new_folder)}\.[A-Za-z0-9_]{{8}}$") if new_folder else None
    ours = {CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE}
    removed = []
    for child in folder.iterdir():
        if _PARTIAL_FILE.match(child.name) and child.is_file():
            child.unlink(missing_ok=True)
            removed.append(child)
        elif staging is not None and staging.match(child.name) and child.is_dir():
            if {p.name for p in child.iterdir()} <= ours:
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    if removed:
        log.info(
            "removed %d temporary file(s) left by an interrupted save in %s", len(removed), folder
        )
    return removed


def _replace_in_place(path: Path, files: dict[str, Any], needed: int) -> Path:
    remove_partial_writes(path)
    staged: dict[str, Path] = {}
    try:
        for name, content in files.items():
            staged[name] = staging_file(path, f".{name}.")
            _write(staged[name], name, content)
    except BaseException as err:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        kept = "the SAE already there is untouched" if (path / CFG_FILE).is_file() else (
            "nothing of it was written"
        )
        full = disk_full_error(err, "SAE", path, needed, kept)
        if full is not None:
            raise full from err
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
        # safetensors makes its files private (0600) whatever the umask; give this one the
        # mode open() would have.
        os.chmod(target, 0o666 & ~current_umask())
    else:
        target.write_text(json.dumps(content, indent=2) + "\n")
    with open(target, "rb") as handle:
        os.fsync(handle.fileno())


def read_json(file: Path) -> dict[str, Any]:
    """A JSON object from `file`; errors name the file (a ValueError lets sources re-fetch)."""
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}); the file may be corrupt") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{file} must hold a JSON object, found {type(raw).__name__}")
    return raw


def _require_cfg(folder: Path) -> Path:
    cfg_path = folder / CFG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"{cfg_path} not found: an SAE folder needs {CFG_FILE} and {WEIGHTS_FILE}"
        )
    return cfg_path


def read_cfg_json(folder: Path) -> dict[str, Any]:
    return read_json(_require_cfg(folder))


def read_safetensors(file: Path) -> dict[str, Tensor]:
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{file} could not be read as safetensors ({err}); is it corrupt?"
        ) from err


def fold_decoder_scales(tensors: dict[str, Tensor], where: str = "") -> dict[str, Tensor]:
    """Older releases carry a per-latent decoder scale; fold it into W_dec."""
    tensors = dict(tensors)
    for name in _DECODER_SCALE_TENSORS:
        scale = tensors.pop(name, None)
        if scale is not None and "W_dec" in tensors:
            d_sae = tensors["W_dec"].shape[0]
            if tuple(scale.shape) != (d_sae,):
                # Broadcasting would otherwise fail obscurely, or inflate W_dec.
                at = f" in {where}" if where else ""
                raise ValueError(
                    f"tensor {name!r}{at} has shape {tuple(scale.shape)}; a per-latent "
                    f"decoder scale for W_dec's {d_sae} rows needs ({d_sae},)"
                )
            tensors["W_dec"] = tensors["W_dec"] * scale.to(tensors["W_dec"].dtype)[:, None]
    return tensors


def check_sparsity(sparsity: Tensor, d_sae: int, where: str) -> None:
    """Refuse a sparsity tensor (log10 firing frequency per latent) of the wrong shape or
    holding NaN or +infinity. -infinity is allowed: the log of a latent that never fired."""
    if tuple(sparsity.shape) != (d_sae,):
        raise ValueError(
            f"{where}: 'sparsity' has shape {tuple(sparsity.shape)}, but the SAE has "
            f"d_sae={d_sae} latents, so it needs ({d_sae},)"
        )
    if not sparsity.is_floating_point():
        raise ValueError(f"{where}: 'sparsity' must hold floats, found {sparsity.dtype}")
    bad = torch.isnan(sparsity) | (sparsity == float("inf"))
    if bool(bad.any()):
        raise NonFiniteWeights(
            f"{where}: 'sparsity' holds {int(bad.sum())} NaN or +inf values (the first at "
            f"latent {int(bad.nonzero()[0])}); a log10 firing frequency is at most 0"
        )


#: Checks tensor shapes (by name, e.g. from a file's header) against what an SAE of a config
#: holds, raising a ValueError that names the source (`saekit.saes.shapes.check_tensor_shapes`:
#: the SAE classes know their tensors, this module only reads files).
ShapeCheck = Callable[[SAEConfig, dict[str, tuple[int, ...]], str], None]


def _check_weights_header(
    cfg: SAEConfig, header: dict[str, TensorHeader], where: str, check_shapes: ShapeCheck | None
) -> None:
    """Compare the tensors a weights file's header declares with those `cfg` needs: names and
    shapes (with `check_shapes`) and a floating-point dtype, each named on failure."""
    shapes = {name: h.shape for name, h in header.items() if name not in _DECODER_SCALE_TENSORS}
    if check_shapes is not None:
        check_shapes(cfg, shapes, where)
    for name, info in header.items():
        if name in _DECODER_SCALE_TENSORS and info.shape != (cfg.d_sae,):
            raise ValueError(
                f"tensor {name!r} in {where} has shape {info.shape}; a per-latent decoder "
                f"scale needs ({cfg.d_sae},)"
            )
        if not info.is_float:
            raise ValueError(
                f"tensor {name!r} in {where} has dtype {info.dtype}; SAE weights are floats"
            )


def read_native(
    source: FileSource,
    folder: str = "",
    *,
    check_shapes: ShapeCheck | None = None,
    overrides: dict[str, Any] | None = None,
) -> SAEFolder:
    """Read a native folder (either cfg.json layout) from a local folder or a Hub repo;
    errors name the file and what is wrong. The config (with the registry's `overrides`)
    is checked against each file's header before any tensor is read, so a cfg.json that
    declares a huge d_sae beside a small weights file fails without allocating it."""
    cfg_path, weights, sparsity_path = (
        join(folder, name) for name in (CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE)
    )
    raw = source.read(cfg_path, read_json)
    cfg = config_from_dict(apply_overrides(raw, overrides), source=source.describe(cfg_path))
    # Reading a header fetches the whole file (once) and re-fetches a truncated download.
    weights_where = source.describe(weights)
    header = source.read(weights, safetensors_header)
    _check_weights_header(cfg, header, weights_where, check_shapes)
    has_sparsity = source.fetch(sparsity_path, required=False) is not None
    if has_sparsity:
        where = source.describe(sparsity_path)
        declared = source.read(sparsity_path, safetensors_header)
        if "sparsity" not in declared:
            raise ValueError(f"{where} has no 'sparsity' tensor (found {sorted(declared)})")
        if declared["sparsity"].shape != (cfg.latent_count,):
            raise ValueError(
                f"{where}: 'sparsity' has shape {declared['sparsity'].shape}, but "
                f"{source.describe(cfg_path)} declares {cfg.latent_count} latents "
                f"(d_sae={cfg.d_sae}), so it needs ({cfg.latent_count},)"
            )
    tensors = fold_decoder_scales(source.read(weights, read_safetensors), weights_where)
    sparsity = None
    if has_sparsity:
        sparsity = source.read(sparsity_path, read_safetensors)["sparsity"]
        check_sparsity(sparsity, cfg.latent_count, source.describe(sparsity_path))
    weights_path = source.fetch(weights)
    assert weights_path is not None
    return SAEFolder(cfg, tensors, sparsity, raw, weights_path)


def read_sae_folder(path: str | Path, check_shapes: ShapeCheck | None = None) -> SAEFolder:
    """Read a native folder on disk (`read_native`, with messages for a missing folder).
    `check_shapes` checks the weights file's header before any tensor is read."""
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"SAE folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(
            f"{folder} is not a folder; SAE.load expects a folder holding {CFG_FILE} and "
            f"{WEIGHTS_FILE}"
        )
    _require_cfg(folder)
    return read_native(LocalSource(folder), check_shapes=check_shapes)
