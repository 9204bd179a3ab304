"""`load_model`: one entry point from a model name or object to a `ModelBackend`."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saekit.config import DTYPES, dtype_name
from saekit.errors import model_load_error
from saekit.models.backend import ModelBackend
from saekit.progress import announces_load

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
    # One argument a call: HookedTransformer.to takes a device or a dtype, not keywords.
    if device is not None:
        model.to(device)
    if dtype is not None:
        model.to(dtype)


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


@announces_load  # `loading model NAME ... 3 s` on stderr; hides the libraries' load noise
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
        backend: "auto", "hf" (module-path hooks, plus TransformerLens names for the families
            saekit maps) or "transformer_lens" (a `HookedTransformer`). The rule for "auto":
            TransformerLens objects get the TransformerLens backend; a name that is an existing
            folder gets Hugging Face; any other name gets TransformerLens when it is one of
            TransformerLens's official model names (or their aliases), Hugging Face otherwise.
        device: where the model runs (e.g. "cpu"); None keeps the model where it is (objects)
            or the library's default (names).
        dtype: float32, bfloat16 or float16 (a name or a torch dtype); None keeps it.
        tokenizer: the tokenizer for a `PreTrainedModel` object (names load their own).
        trust_remote_code: let transformers run code from the model's repository; off by
            default because that code runs on this machine.
        device_map: Hugging Face models by name: shard the model over several devices
            (e.g. "auto", which needs the accelerate package); `device` is then ignored.

    Hugging Face checkpoints load with the class that matches them: a causal LM
    (`AutoModelForCausalLM`) when the checkpoint is one, else the base model (`AutoModel`;
    `T5EncoderModel` for T5-style configs) with no randomly initialised head. Only causal LMs
    have `logits` (`backend.causal_lm`); encoders give activations. A local folder is recorded
    in `backend.name` as its absolute path.
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
    if Path(name).is_dir():
        # An absolute path, so that an SAE trained from this model records a name that
        # resolves from anywhere.
        name = str(Path(name).resolve())
    if backend == "auto":
        backend = "hf" if Path(name).is_dir() or not _is_tl_official_name(name) else (
            "transformer_lens"
        )
    if backend == "transformer_lens":
        if device_map is not None:
            raise ValueError(
                "device_map shards Hugging Face models; TransformerLens models take n_devices "
                "instead; use backend 'hf' or drop device_map"
            )
        if Path(name).is_dir():
            raise ValueError(
                f"{name} is a folder, but TransformerLens loads models by their official "
                "names only; use backend 'hf' (TransformerLens names work there for the "
                "families saekit maps) or pass a HookedTransformer / TransformerBridge object"
            )
        from transformer_lens import HookedTransformer

        from saekit.models.tl import TransformerLensBackend

        kwargs: dict[str, Any] = {}
        if torch_dtype is not None:
            kwargs["dtype"] = torch_dtype
        model = HookedTransformer.from_pretrained(name, device=device, **kwargs)
        return TransformerLensBackend(model, name=name)
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


# Base-model classes of T5-style configs: the encoder alone (the decoder needs its own inputs).
_T5_ENCODERS = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}


def _is_causal_lm_config(config: Any) -> bool:
    """Whether a checkpoint's config describes a causal LM (with its next-token head)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return True
    causal_classes = {
        cls
        for classes in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
        for cls in ((classes,) if isinstance(classes, str) else classes)
    }
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        return any(
            arch in causal_classes or arch.endswith(("ForCausalLM", "LMHeadModel"))
            for arch in architectures
        )
    model_type = getattr(config, "model_type", None)
    return (
        model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
        and not getattr(config, "is_encoder_decoder", False)
    )


@contextmanager
def _quiet_load_report() -> Iterator[None]:
    """Silence transformers' load report while a base model loads from a checkpoint that
    has a head: the report would list the head's weights, which are left out on purpose."""
    report_logger = logging.getLogger("transformers.modeling_utils")
    level = report_logger.level
    report_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        report_logger.setLevel(level)


def _load_base_model(name: str, config: Any, kwargs: dict[str, Any]) -> nn.Module:
    import transformers

    encoder = _T5_ENCODERS.get(getattr(config, "model_type", None))
    cls = getattr(transformers, encoder) if encoder else transformers.AutoModel
    with _quiet_load_report():
        model, info = cls.from_pretrained(name, config=config, output_loading_info=True, **kwargs)
    missing = list(info.get("missing_keys", []))
    if missing and getattr(model, "pooler", None) is not None and all(
        key.startswith("pooler.") for key in missing
    ):
        # A masked-LM checkpoint has no pooler; the base class would add a random one.
        model.pooler = None
    elif missing:
        logger.warning(
            "%s: %d weights are not in the checkpoint and were initialised at random "
            "(e.g. %s); activations of those modules mean nothing",
            name, len(missing), ", ".join(missing[:3]),
        )
    return model


def _load_hf(
    name: str,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    trust: bool,
    device_map: str | dict[str, Any] | None = None,
) -> ModelBackend:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from saekit.models.hf import HFBackend

    kwargs: dict[str, Any] = {"trust_remote_code": trust}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust)
    except (OSError, ValueError) as err:  # no such folder or Hub id, or the Hub out of reach
        raise model_load_error(name, err) from err
    if _is_causal_lm_config(config):
        model = AutoModelForCausalLM.from_pretrained(name, config=config, **kwargs)
    else:
        model = _load_base_model(name, config, kwargs)
    if device_map is None:  # a sharded model stays where device_map put each part
        _move(model, device, None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust)
    except (OSError, ValueError) as err:
        logger.warning("no tokenizer found for %s (%s); continuing without one", name, err)
        tokenizer = None
    return HFBackend(model, tokenizer=tokenizer, name=name)
