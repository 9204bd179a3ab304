"""Shapes and dtypes of the tensors in a weights file, read from its header alone.

Loaders compare these with the config before reading (or allocating) anything, so a
cfg.json that declares a billion latents beside an 8 KB weights file, or an .npz whose
arrays inflate far beyond the file, fails at once with a shape error.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

#: Bytes per element of the safetensors dtypes.
SAFETENSORS_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
#: The safetensors dtypes a weight may have.
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
#: The longest header the safetensors format allows.
MAX_HEADER_BYTES = 100_000_000
#: An .npz may hold at most this many times its own size in arrays (beyond NPZ_FREE_BYTES):
#: trained weights are close to random bits and deflate by a few percent, so arrays that
#: inflate far more are mostly one repeated value, not an SAE.
NPZ_MAX_INFLATION = 100
NPZ_FREE_BYTES = 64 * 2**20


class TensorHeader(NamedTuple):
    """One tensor as a file's header describes it."""

    shape: tuple[int, ...]
    dtype: str
    """The file format's own spelling ("F32" for safetensors, "float32" for numpy)."""
    is_float: bool


def _damaged(file: Path, why: str) -> ValueError:
    return ValueError(f"{file} could not be read as safetensors ({why}); is it corrupt?")


def safetensors_header(file: Path) -> dict[str, TensorHeader]:
    """Every tensor of a safetensors file, from its header: the 8-byte little-endian header
    length, then a JSON object giving each tensor's dtype, shape and byte range. The byte
    ranges are checked against the file's size, so the shapes are ones the file holds."""
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found")
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _damaged(file, "shorter than a header")
        length = int.from_bytes(head, "little")
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise _damaged(file, f"its header claims {length} bytes")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _damaged(file, f"its header is not JSON: {err}") from err
    if not isinstance(header, dict):
        raise _damaged(file, "its header is not a JSON object")
    data_bytes = size - 8 - length
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            if not all(isinstance(n, int) and n >= 0 for n in (*shape, begin, end)):
                raise TypeError(shape)
        except (KeyError, TypeError, ValueError) as err:
            raise _damaged(file, f"its header entry for {name!r} is malformed") from err
        itemsize = SAFETENSORS_ITEMSIZE.get(dtype)
        if itemsize is None:
            raise _damaged(file, f"tensor {name!r} has unknown dtype {dtype!r}")
        if end - begin != math.prod(shape) * itemsize or end > data_bytes:
            raise _damaged(
                file, f"tensor {name!r} of shape {list(shape)} does not match its bytes"
            )
        out[name] = TensorHeader(tuple(shape), dtype, dtype in FLOAT_DTYPES)
    return out


def npz_headers(file: Path) -> dict[str, TensorHeader]:
    """Every array of an .npz file, from the .npy header at the start of each zip member
    (decompressing only those few bytes). Each member's uncompressed size, from the zip
    directory, must match its declared shape; object arrays (pickles) are refused, and so
    are arrays that would inflate to more than NPZ_MAX_INFLATION times the file."""
    out = {}
    try:
        with zipfile.ZipFile(file) as archive:
            inflated = sum(info.file_size for info in archive.infolist())
            size = file.stat().st_size
            if inflated > max(NPZ_MAX_INFLATION * size, NPZ_FREE_BYTES):
                raise ValueError(
                    f"its arrays would take {inflated:,} bytes, {inflated / size:,.0f} times "
                    "the file; trained weights do not compress like that"
                )
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                name = info.filename[: -len(".npy")]
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
                    else:
                        raise ValueError(f"array {name!r} has .npy version {version}")
                    header_bytes = member.tell()
                if dtype.hasobject:
                    raise ValueError(f"array {name!r} holds Python objects (a pickle)")
                shape = tuple(int(n) for n in shape)
                if info.file_size != header_bytes + math.prod(shape) * dtype.itemsize:
                    raise ValueError(
                        f"array {name!r} of shape {list(shape)} does not match its "
                        f"{info.file_size} bytes"
                    )
                out[name] = TensorHeader(shape, str(dtype), dtype.kind == "f")
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        raise ValueError(f"{file} could not be read as .npz ({err}); is it corrupt?") from err
    return out
