"""Training checkpoints: written atomically, checksummed, read back with
`torch.load(weights_only=True)`.

A checkpoint is a folder `checkpoints/tokens_<n>/` holding `state.pt` and `checksum.json`
(the byte size and SHA-256 of state.pt, computed while it is written). It is assembled under
a temporary name and renamed into place, so a crash mid-write leaves the previous checkpoint
as it was and only a `.tmp-*` folder behind, which the next write (or resume) clears away. A
write that finds the disk full removes its partial files and says how much space it needed.

Reading checks the size and checksum first: a checkpoint damaged later (a truncated copy, a
bad disk) is refused by name, and `load_intact_checkpoint` falls back to the newest intact
one, moving the damaged ones aside (`damaged-tokens_<n>`) so that they are kept but never
read again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from saekit.errors import disk_full_error
from saekit.io.native import make_staging_dir

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.pt"
CHECKSUM_FILE = "checksum.json"
FORMAT_VERSION = 1
_NAME = re.compile(r"^tokens_(\d+)$")
#: Prefix a damaged checkpoint's folder gets, so that it is kept but no longer listed.
DAMAGED_PREFIX = "damaged-"
_HASH_PIECE_BYTES = 1 << 20


class CorruptCheckpoint(ValueError):
    """A checkpoint whose files are not what was written (truncated, altered, unreadable)."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _NAME.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Remove the staging folders of checkpoint writes that never finished."""
    folder = checkpoint_dir(run_dir)
    if folder.is_dir():
        for stale in folder.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)


class _HashingWriter:
    """A binary file that hashes and counts what passes through it (torch.save writes
    through `write` alone), so the checksum costs no second read of the file."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def _tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in a nested state (what a checkpoint of it about needs)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def write_checkpoint(run_dir: Path, tokens: int, state: dict[str, Any], keep: int) -> Path:
    """Write `state` as the checkpoint at `tokens`, then delete all but the newest `keep`."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    remove_partial_checkpoints(run_dir)
    final = folder / f"tokens_{tokens:015d}"
    staging = make_staging_dir(folder, ".tmp-")
    try:
        target = staging / STATE_FILE
        # Through a Python file object, so a full disk is an OSError with its errno (a path
        # makes torch's own writer report it as an unexplained RuntimeError).
        with open(target, "wb") as handle:
            writer = _HashingWriter(handle)
            torch.save({"format": FORMAT_VERSION, **state}, writer)
            handle.flush()
            os.fsync(handle.fileno())
        checksum = {"file": STATE_FILE, "bytes": writer.size, "sha256": writer.sha256.hexdigest()}
        with open(staging / CHECKSUM_FILE, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(checksum) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if final.exists():  # same token count written twice (e.g. a signal right at a boundary)
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_dir(folder)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        intact = (
            f"the previous checkpoint {previous.name} is intact" if previous is not None
            else "the run has no earlier checkpoint"
        )
        full = disk_full_error(
            err, "checkpoint", final, _tensor_bytes(state),
            f"{intact}. Free some space (or keep fewer checkpoints: --keep-checkpoints) and "
            f"continue with `saekit train --resume {run_dir}`",
        )
        if full is not None:
            raise full from err
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(path: Path) -> None:
    """Refuse a checkpoint whose state.pt does not have the size and SHA-256 recorded when it
    was written. Checkpoints written before checksums were recorded pass unchecked."""
    file = Path(path) / STATE_FILE
    record_file = Path(path) / CHECKSUM_FILE
    if not record_file.is_file():
        return
    try:
        record = json.loads(record_file.read_text(encoding="utf-8"))
        size, digest = int(record["bytes"]), str(record["sha256"])
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptCheckpoint(f"{record_file} is damaged ({err})") from None
    actual = file.stat().st_size
    if actual != size:
        raise CorruptCheckpoint(
            f"{file} is {actual} bytes, but {size} were written (a truncated or partial copy)"
        )
    sha = hashlib.sha256()
    with open(file, "rb") as handle:
        while piece := handle.read(_HASH_PIECE_BYTES):
            sha.update(piece)
    if sha.hexdigest() != digest:
        raise CorruptCheckpoint(f"{file} does not match the checksum recorded when it was written")


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The state saved in checkpoint folder `path`, after checking its checksum; a damaged
    checkpoint is a `CorruptCheckpoint` saying what is wrong."""
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint file {file} not found")
    verify_checkpoint(path)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as err:
        raise CorruptCheckpoint(
            f"{file} cannot be read ({type(err).__name__}): it is cut short or not a checkpoint"
        ) from err
    if not isinstance(state, dict):
        raise CorruptCheckpoint(f"{file} does not hold a checkpoint (found a {type(state)})")
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"{file} has checkpoint format {state.get('format')!r}; this saekit reads format "
            f"{FORMAT_VERSION}"
        )
    return state


class IntactCheckpoint:
    """The newest checkpoint of a run that reads back whole, and the newer ones that did not."""

    def __init__(self, path: Path, state: dict[str, Any], damaged: list[tuple[Path, str]]):
        self.path = path
        self.state = state
        self.damaged = damaged
        """(where the damaged checkpoint was moved, why it was refused), newest first."""


def load_intact_checkpoint(run_dir: Path) -> IntactCheckpoint | None:
    """The newest checkpoint of `run_dir` that passes its checksum and loads; None when the
    run has none. Damaged newer ones are logged and renamed `damaged-tokens_<n>` (kept for
    inspection, never listed again). When every checkpoint is damaged, a `CorruptCheckpoint`
    lists them all and nothing is moved."""
    found = list_checkpoints(run_dir)
    if not found:
        return None
    refused: list[tuple[Path, str]] = []
    for path in reversed(found):
        try:
            state = read_checkpoint(path)
        except CorruptCheckpoint as err:
            log.warning("checkpoint %s is damaged: %s", path.name, err)
            refused.append((path, str(err)))
            continue
        # Moved aside, so that pruning never keeps them in place of intact ones.
        damaged = []
        for bad, why in refused:
            aside = bad.with_name(DAMAGED_PREFIX + bad.name)
            if aside.exists():
                shutil.rmtree(aside)
            os.replace(bad, aside)
            damaged.append((aside, why))
        if damaged:
            log.warning(
                "resuming from the older checkpoint %s instead; the damaged one(s) are kept "
                "as %s", path.name, ", ".join(p.name for p, _ in damaged),
            )
        return IntactCheckpoint(path, state, damaged)
    reasons = "; ".join(f"{p.name}: {why}" for p, why in refused)
    raise CorruptCheckpoint(
        f"every checkpoint of {run_dir} is damaged, so the run cannot resume ({reasons}); "
        f"start it again with `saekit train --out {run_dir} --overwrite` and the same settings"
    )


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every random generator a run may draw from, in a form weights_only loading accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ),
        "torch": torch.get_rng_state(),
    }
    if device.type != "cpu":
        state["accelerator"] = torch.get_device_module(device.type).get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(_as_tuples(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type != "cpu" and "accelerator" in state:
        torch.get_device_module(device.type).set_rng_state_all(state["accelerator"])


def _as_tuples(value: Any) -> Any:
    """random.setstate needs tuples where a round trip may give lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value
