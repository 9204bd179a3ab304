"""One activation-cache shard on disk: check it, then serve its tensors where they lie.

A shard is a safetensors file: an 8-byte little-endian header length, a JSON header giving
each tensor's dtype, shape and byte range, then the data. Its progress record (written with
it) gives its rows, byte size and CRC-32.

Reading happens in two steps so the expensive one can run ahead in another thread:
`check_shard` reads the whole file once through a small reused buffer, comparing size,
header and CRC-32 with the record (the read also brings the file into the page cache);
`map_shard` then maps the checked file and returns its tensors as views of the mapping, so
no copy of the shard is made: batches are gathered straight from the page cache.
"""

from __future__ import annotations

import json
import mmap
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saekit.finite import NonFiniteActivations, locate_non_finite

_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
#: Bytes read (and checksummed) at a time while checking: small enough to stay in the
#: processor's cache between the read and the CRC, large enough to keep system calls few.
CHECK_PIECE_BYTES = 2**20


class CacheError(ValueError):
    """A cache folder that cannot be used as it is; the message says why and what to do."""


def shard_path(folder: Path, record: Any) -> Path:
    """The shard file a progress record names, refusing any name that is not a plain file
    name inside `folder`: progress.json is data, and an absolute or `..` path in it would
    make a reader open files elsewhere."""
    name = record.get("file") if isinstance(record, dict) else None
    if (
        not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name
        or "\0" in name or Path(name).name != name or Path(name).is_absolute()
    ):
        raise CacheError(
            f"{folder / 'progress.json'} has a shard entry {record!r} whose file is not a "
            "plain file name inside the cache folder; the cache is damaged or was edited, "
            "write it again"
        )
    return folder / name


def check_progress_records(folder: Path, records: Any) -> list[dict[str, Any]]:
    """The progress records of a cache, each checked to name a shard file inside `folder`
    and to give whole-number rows and bytes and a CRC-32."""
    if not isinstance(records, list):
        raise CacheError(
            f"{folder / 'progress.json'} must hold a list of shard records; write the cache "
            "again"
        )
    for record in records:
        shard_path(folder, record)
        fields_ok = (
            isinstance(record.get("rows"), int) and not isinstance(record["rows"], bool)
            and record["rows"] >= 0
            and isinstance(record.get("bytes"), int) and not isinstance(record["bytes"], bool)
            and record["bytes"] >= 0
            and isinstance(record.get("crc32"), str)
        )
        if not fields_ok:
            raise CacheError(
                f"{folder / 'progress.json'} has a shard entry for {record['file']!r} without "
                "whole-number rows and bytes and a crc32; the cache is damaged, write it again"
            )
    return records


def check_shard_finite(layout: ShardLayout) -> None:
    """Refuse a checked shard whose activations hold NaN or infinity, naming the file, hook
    and row (one reduction per tensor when they are all finite)."""
    for hook, tensor in map_shard(layout).items():
        found = locate_non_finite(tensor)
        if found is not None:
            raise NonFiniteActivations(
                f"shard {layout.path} of the activation cache holds non-finite activations "
                f"at {hook}: {found.describe(('row', 'feature'))} of its {layout.rows} rows. "
                "The model produced them when the cache was written (a float16 model "
                "overflows above 65504), or the file was changed since; write the cache "
                "again from a model in float32 or bfloat16"
            )


@dataclass(frozen=True)
class ShardTensor:
    """Where one hook's [rows, d_in] tensor lies in a shard file."""

    dtype: torch.dtype
    offset: int
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ShardLayout:
    """A checked shard: its path, byte size, rows and the tensors of the hooks asked for."""

    path: Path
    size: int
    rows: int
    tensors: dict[str, ShardTensor]


def _parse_header(
    header_bytes: bytes, path: Path, record: dict[str, Any], hooks: list[str]
) -> ShardLayout:
    try:
        header = json.loads(header_bytes)
        entries = {name: info for name, info in header.items() if name != "__metadata__"}
        shapes = {name: tuple(info["shape"]) for name, info in entries.items()}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError,
            AttributeError) as err:
        raise CacheError(f"shard {path} has a damaged header; write the cache again") from err
    rows = int(record["rows"])
    data_start = 8 + len(header_bytes)
    tensors = {}
    for hook in hooks:
        if hook not in entries:
            raise CacheError(f"shard {path} holds no tensor for hook {hook!r}")
        info = entries[hook]
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
        begin, end = info.get("data_offsets", (0, -1))
        shape = shapes[hook]
        if dtype is None or len(shape) != 2 or shape[0] != rows:
            raise CacheError(
                f"shard {path}: {hook} has dtype {info.get('dtype')} and shape {list(shape)}, "
                f"the progress record says {rows} rows; the cache is damaged, write it again"
            )
        size = shape[0] * shape[1] * dtype.itemsize
        if end - begin != size or data_start + end > record["bytes"]:
            raise CacheError(f"shard {path} has a damaged header; write the cache again")
        tensors[hook] = ShardTensor(dtype, data_start + begin, shape)
    return ShardLayout(path, int(record["bytes"]), rows, tensors)


def check_shard(path: Path, record: dict[str, Any], hooks: list[str]) -> ShardLayout:
    """Read shard `path` once, checking its size, header and CRC-32 against its progress
    `record`; returns where the `hooks`' tensors lie. Raises `CacheError` on any mismatch.

    Both the reads and zlib's CRC release the GIL, so this runs alongside other work when
    called from a second thread."""
    try:
        f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise CacheError(f"shard {path} is missing; write the cache again") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size != record["bytes"]:
            raise CacheError(
                f"shard {path} has {size} bytes, {record['bytes']} were written: it is "
                "truncated or was changed; write the cache again"
            )
        head = f.read(8)
        header_length = int.from_bytes(head, "little") if len(head) == 8 else size
        if header_length > size - 8:
            raise CacheError(f"shard {path} has a damaged header; write the cache again")
        header_bytes = f.read(header_length)
        layout = _parse_header(header_bytes, path, record, hooks)
        crc = zlib.crc32(header_bytes, zlib.crc32(head))
        piece = bytearray(CHECK_PIECE_BYTES)
        view = memoryview(piece)
        while n := f.readinto(view):
            crc = zlib.crc32(view[:n], crc)
    if f"{crc:08x}" != record["crc32"]:
        raise CacheError(
            f"shard {path} fails its CRC-32 check: it is corrupted; write the cache again"
        )
    return layout


def map_shard(layout: ShardLayout) -> dict[str, Tensor]:
    """The checked shard's tensors as read-only views of a memory mapping of its file.

    The mapping is private (copy-on-write), so nothing written to the tensors could reach
    the file; it is released when the last tensor is. The size is checked again first: a
    file cut short after its check would otherwise fault when its rows are read."""
    with open(layout.path, "rb") as f:
        if os.fstat(f.fileno()).st_size != layout.size:
            raise CacheError(
                f"shard {layout.path} changed size while it was being read; write the cache "
                "again, and do not write into a cache that training is reading"
            )
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    out = {}
    for hook, where in layout.tensors.items():
        flat = torch.frombuffer(mapping, dtype=where.dtype, offset=where.offset,
                                count=where.shape[0] * where.shape[1])
        out[hook] = flat.view(where.shape)
    return out
