"""Checks made before any work starts: the device, the dtype on it, the context size against
the model, local text files. Each fails with a `SaekitError` naming the input and the fix,
so a mistake costs seconds, not a model load and a training run."""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any

import torch

from saekit.errors import SaekitError

#: Bytes read at a time when checking a text file.
_CHUNK_BYTES = 1 << 20
#: Bytes at the start of a file searched for NUL bytes, which text never holds.
_BINARY_PROBE_BYTES = 8192
#: Dtypes an SAE trains in on CPU (the sparse kernels' backward has no CPU half kernels).
CPU_TRAIN_DTYPES = ("float32", "float64")


def check_device(name: str | torch.device | None, flag: str = "--device") -> None:
    """Refuse a device this machine does not have (`cuda` without a GPU, `cuda:3` with
    one GPU) or a name torch does not know, before anything is loaded onto it."""
    if name is None:
        return
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError) as err:
        raise SaekitError(
            f"{flag} {name}: not a device name torch knows ({str(err).splitlines()[0]}); "
            "use cpu, cuda, cuda:N or mps"
        ) from None
    if device.type in ("cpu", "meta"):
        return
    module = getattr(torch, device.type, None)
    available = getattr(module, "is_available", None)
    if available is None or not available():
        built = ""
        if device.type == "cuda" and not torch.backends.cuda.is_built():
            built = " (this torch build has no CUDA support)"
        raise SaekitError(
            f"{flag} {name}: no such device is available on this machine; torch finds no "
            f"{device.type} device{built}. Use {flag} cpu, or run where a {device.type} "
            "device is"
        )
    count = getattr(module, "device_count", lambda: 1)()
    if device.index is not None and device.index >= count:
        raise SaekitError(
            f"{flag} {name}: no such device; this machine has {count} {device.type} "
            f"device(s), {device.type}:0 to {device.type}:{count - 1}"
        )


def check_train_dtype(dtype: str, device: str | torch.device, flag: str = "--dtype") -> None:
    """Refuse an SAE dtype that cannot train on `device`: float16 and bfloat16 train on
    accelerators only (autocast there); on CPU the SAE trains in float32 or float64."""
    if torch.device(device).type == "cpu" and dtype not in CPU_TRAIN_DTYPES:
        raise SaekitError(
            f"{flag} {dtype} does not train on CPU: the SAE's sparse kernels have no "
            f"{dtype} CPU version. Train in float32 on CPU ({flag} float32, the default), or "
            f"use {dtype} on a GPU (--device cuda)"
        )


def max_positions(backend: Any) -> int | None:
    """The most positions a model reads in one sequence: TransformerLens's `cfg.n_ctx`, or
    a Hugging Face config's `n_positions` / `max_position_embeddings`; None when the model
    states no limit (relative positions, an unknown backend)."""
    model = getattr(backend, "model", backend)
    tl_cfg = getattr(model, "cfg", None)
    value = getattr(tl_cfg, "n_ctx", None)
    if isinstance(value, int) and value > 0:
        return value
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_context_size(backend: Any, context_size: int, flag: str = "--context-size") -> None:
    """Refuse a context size longer than the model's position limit (the forward pass would
    fail, or read positions the model never learned), before any text is tokenized."""
    limit = max_positions(backend)
    if limit is not None and context_size > limit:
        name = getattr(backend, "name", None) or type(getattr(backend, "model", backend)).__name__
        raise SaekitError(
            f"{flag} {context_size} is longer than the model {name} reads: it has "
            f"{limit} positions. Use {flag} {limit} or less"
        )


def check_text_file(path: Path, allow_empty: bool = False) -> None:
    """Refuse a local text file (txt, jsonl, json, csv) that holds no text (unless
    `allow_empty`), is binary, or is not UTF-8, naming the byte and line of the first bad
    byte.

    Files are read strictly as UTF-8: decoding with replacement characters would train on
    garbled text without anyone noticing, so the user re-encodes the file once instead."""
    size = path.stat().st_size
    if size == 0 and allow_empty:
        return
    if size == 0:
        raise SaekitError(f"{path} holds no text (the file is empty); pass a file with text in it")
    with path.open("rb") as handle:
        head = handle.read(_BINARY_PROBE_BYTES)
        nul = head.find(b"\0")
        if nul >= 0:
            raise SaekitError(
                f"{path} is a binary file, not text (a NUL byte at byte offset {nul}); pass a "
                "UTF-8 text file"
            )
        handle.seek(0)
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        offset, line, blank = 0, 1, True
        while chunk := handle.read(_CHUNK_BYTES):
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as err:
                # err.object is the bytes held back from the last chunk, then this one.
                at = offset - (len(err.object) - len(chunk)) + err.start
                line += err.object[: err.start].count(b"\n")
                bad = err.object[err.start : err.start + 1].hex()
                raise SaekitError(
                    f"{path} is not UTF-8 text: byte 0x{bad} at byte offset {at} (line {line}) "
                    f"is not valid UTF-8 ({err.reason}); the file is probably in another "
                    "encoding such as latin-1 or cp1252. Re-encode it as UTF-8, e.g. "
                    f"`iconv -f latin1 -t utf-8 {path} > utf8.txt`"
                ) from None
            blank = blank and not text.strip()
            line += chunk.count(b"\n")
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as err:
            raise SaekitError(
                f"{path} is not UTF-8 text: it ends inside a multi-byte character at byte "
                f"offset {offset - len(err.object) + err.start}; the file is cut short or in "
                "another encoding. Re-encode it as UTF-8"
            ) from None
    if blank and not allow_empty:
        raise SaekitError(
            f"{path} holds no text (only white space); pass a file with text in it"
        )


def check_local_dataset(source: Any, flag: str = "--dataset") -> None:
    """A dataset given as a path: refuse it if it does not exist, or if it is a text file
    that holds no text, is binary or is not UTF-8. Hub names and in-memory data pass."""
    from saekit.data.text import BUNDLED_DATASET, FILE_BUILDERS, TEXT_BUILDERS
    from saekit.errors import looks_like_path, no_such_path_message

    if not isinstance(source, (str, Path)) or source == BUNDLED_DATASET:
        return
    path = Path(source).expanduser()
    if path.is_file() and FILE_BUILDERS.get(path.suffix.lower()) in TEXT_BUILDERS:
        check_text_file(path)
    elif not path.exists() and looks_like_path(source, tuple(FILE_BUILDERS)):
        raise FileNotFoundError(
            f"{flag}: {no_such_path_message(source, 'dataset file or folder')}; pass an "
            "existing file or folder, or a Hub dataset name (owner/name)"
        )


def check_out_folder(path: str | Path, flag: str = "--out") -> None:
    """Refuse an output folder that is an existing file, before any work is done for it."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise SaekitError(f"{flag} {path} is a file, not a folder; pass a folder to write into")
