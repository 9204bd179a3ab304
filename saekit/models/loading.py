"""`load_model`: one entry point from a model name or object to a `ModelBackend`."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saekit.config import DTYPES, dtype_name
from saekit.models.backend import ModelBackend

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "hf", "transformer_lens")


def _torch_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    return None if dtype is None else DTYPES[dtype_name(dtype)]


def _is_tl_model(obj: Any) -> bool:
    return hasattr(obj, "hook_dict") and hasattr(obj, "hooks") and isinstance(obj, nn.Module)


def _bundled_module() -> Any:
    try:
        return importlib.import_module("saekit.models.bundled")
    except ModuleNotFoundError as err:
        if err.name != "saekit.models.bundled":
            raise
        raise ValueError(
            "the bundled model is not available in this installation of saekit "
            "(saekit.models.bundled is missing); name a Hugging Face model or folder instead"
        ) from err


def _move(model: nn.Module, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)


def _is_tl_official_name(name: str) -> bool:
    try:
        from transformer_lens.loading_from_pretrained import get_official_model_name
    except ImportError:
        return False
    try:
        get_official_model_name(name)
    except ValueError:
        return False
    return True


def load_model(
    name_or_object: str | Path | nn.Module | ModelBackend,
    backend: str = "auto",
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    tokenizer: Any = None,
    trust_remote_code: bool = False,
    device_map: str | dict[str, Any] | None = None,
) -> ModelBackend:
    """A `ModelBackend` for a model given by name or as an object.

    Args:
        name_or_object: "bundled" (the demo model shipped with saekit); a local Hugging Face
            folder or a Hub id; a TransformerLens model name ("gpt2-small"); or an object: a
            `HookedTransformer`, a `TransformerBridge`, a `PreTrainedModel`, or a backend
            (returned as it is).
        backend: "auto", "hf" (module-path hooks) or "transformer_lens" (TransformerLens hook
            names). "auto" picks TransformerLens for TransformerLens objects and official
            TransformerLens names, Hugging Face otherwise.
        device: where the model runs (e.g. "cpu"); None keeps the model where it is (objects)
            or the library's default (names).
        dtype: float32, bfloat16 or float16 (a name or a torch dtype); None keeps it.
        tokenizer: the tokenizer for a `PreTrainedModel` object (names load their own).
        trust_remote_code: let transformers run code from the model's repository; off by
            default because that code runs on this machine.
        device_map: Hugging Face models by name: shard the model over several devices
            (e.g. "auto", which needs the accelerate package); `device` is then ignored.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not known; use one of {', '.join(BACKENDS)}")
    torch_dtype = _torch_dtype(dtype)
    if isinstance(name_or_object, ModelBackend) and not isinstance(name_or_object, nn.Module):
        return name_or_object
    if isinstance(name_or_object, nn.Module):
        return _from_object(name_or_object, backend, device, torch_dtype, tokenizer)
    if not isinstance(name_or_object, (str, Path)):
        raise TypeError(
            f"cannot load a model from a {type(name_or_object).__name__}; pass a name, a "
            "folder, a HookedTransformer / TransformerBridge or a PreTrainedModel"
        )
    name = str(name_or_object)
    if name == "bundled":
        return _load_bundled(backend, device, torch_dtype)
    if backend == "auto":
        backend = "hf" if Path(name).is_dir() or not _is_tl_official_name(name) else (
            "transformer_lens"
        )
    if backend == "transformer_lens":
        from transformer_lens import HookedTransformer

        from saekit.models.tl import TransformerLensBackend

        kwargs: dict[str, Any] = {}
        if torch_dtype is not None:
            kwargs["dtype"] = torch_dtype
        model = HookedTransformer.from_pretrained(name, device=device, **kwargs)
        return TransformerLensBackend(model, name=name)
    if device_map is not None and backend == "transformer_lens":
        raise ValueError(
            "device_map shards Hugging Face models; TransformerLens models take n_devices "
            "instead; use backend 'hf' or drop device_map"
        )
    return _load_hf(name, device, torch_dtype, trust_remote_code, device_map)


def _from_object(
    model: nn.Module,
    backend: str,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    tokenizer: Any,
) -> ModelBackend:
    from saekit.models.hf import HFBackend
    from saekit.models.tl import TransformerLensBackend

    _move(model, device, dtype)
    if _is_tl_model(model):
        if backend == "hf":
            raise ValueError(
                f"{type(model).__name__} is a TransformerLens model; use backend "
                "'transformer_lens' or 'auto'"
            )
        return TransformerLensBackend(model)
    if backend == "transformer_lens":
        raise ValueError(
            f"{type(model).__name__} is not a TransformerLens model; use backend 'hf' or "
            "'auto', or convert it to a HookedTransformer first"
        )
    if not hasattr(model, "config"):
        raise TypeError(
            f"{type(model).__name__} is neither a Hugging Face PreTrainedModel nor a "
            "TransformerLens model"
        )
    return HFBackend(model, tokenizer=tokenizer)


def _load_bundled(
    backend: str, device: torch.device | str | None, dtype: torch.dtype | None
) -> ModelBackend:
    bundled = _bundled_module()
    if backend == "transformer_lens":
        from saekit.models.tl import TransformerLensBackend

        model = bundled.load_bundled_hooked_transformer()
        _move(model, device, dtype)
        return TransformerLensBackend(model, name="bundled")
    from saekit.models.hf import HFBackend

    model = bundled.load_bundled_hf()
    _move(model, device, dtype)
    return HFBackend(model, tokenizer=bundled.load_bundled_tokenizer(), name="bundled")


def _load_hf(
    name: str,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    trust: bool,
    device_map: str | dict[str, Any] | None = None,
) -> ModelBackend:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from saekit.models.hf import HFBackend

    kwargs: dict[str, Any] = {"trust_remote_code": trust}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    if device_map is None:  # a sharded model stays where device_map put each part
        _move(model, device, None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust)
    except (OSError, ValueError) as err:
        logger.warning("no tokenizer found for %s (%s); continuing without one", name, err)
        tokenizer = None
    return HFBackend(model, tokenizer=tokenizer, name=name)
