"""Checks made before any work starts: the device, the dtype on it, the context size against
the model, local text files, a fine-tuned SAE's widths against the model's. Each fails with a
`SaekitError` naming the input and the fix, so a mistake costs seconds, not a model load and
a training run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from saekit.errors import SaekitError

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
        is_built = getattr(getattr(torch.backends, device.type, None), "is_built", None)
        if callable(is_built) and not is_built():
            built = f" (this torch build has no {device.type} support)"
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


def check_local_dataset(source: Any, flag: str = "--dataset") -> None:
    """A dataset given as a path: refuse it if it does not exist, or if it is a text file
    that holds no text, is binary or is not UTF-8. Hub names and in-memory data pass."""
    from saekit.data.text import BUNDLED_DATASET, FILE_BUILDERS, TEXT_BUILDERS, check_text_file
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


def check_hook_widths(backend: Any, widths: dict[str, int], what: str) -> None:
    """Refuse a model whose activation at each hook of `widths` ({hook: width}) is not that
    wide, from one forward pass over two tokens (no text is read). `what` names the SAE in
    the message ("the SAE of --init-from runs/a"). A hook the model lacks fails here too."""
    from saekit.data.store import flatten_activation

    tokenizer = getattr(backend, "tokenizer", None)
    probe_id = 0
    for attr in ("bos_token_id", "pad_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            probe_id = int(value)
            break
    probe = torch.full((1, 2), probe_id, dtype=torch.long)
    with torch.no_grad():
        acts = backend.activations(probe, list(widths))
    model = getattr(backend, "name", None) or "the model"
    for hook, width in widths.items():
        found = int(flatten_activation(acts[hook]).shape[-1])
        if found != width:
            raise SaekitError(
                f"{what} reads activations of width {width} at {hook}, but {model} gives "
                f"width {found} there: its d_model does not match the SAE's d_in. Fine-tune "
                f"on a model whose activations at {hook} are {width} wide"
            )
