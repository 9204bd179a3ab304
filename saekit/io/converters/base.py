"""What every converter shares: its result type, the context it gets, small tensor helpers."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from torch import Tensor

from saekit.config import dtype_name
from saekit.io.native import ShapeCheck


class ConvertContext(NamedTuple):
    """What a converter may know beyond the files: from the registry when there is one."""

    folder: str
    """Folder inside the repo that holds the SAE ("" for the repo root)."""
    repo_id: str | None = None
    """Hub repo id, when loading from the Hub (some layouts encode the hook site in it)."""
    model: str | None = None
    """Model the release reads, from the registry."""
    config_overrides: dict[str, Any] | None = None
    """The registry's cfg.json overrides. `fetch_pretrained` applies them to every converter's
    result; a converter that checks files against a cfg.json applies them first too."""
    check_shapes: ShapeCheck | None = None
    """Checks tensor shapes against a config (`SAE.check_tensor_shapes`), for converters that
    compare a weights file's header with a cfg.json before reading any tensor."""


class Converted(NamedTuple):
    """An SAE in saekit's terms: a cfg.json dict (either layout) and native tensors."""

    cfg: dict[str, Any]
    tensors: dict[str, Tensor]
    sparsity: Tensor | None = None


def current_cfg(
    architecture: str,
    tensors: dict[str, Tensor],
    metadata: dict[str, Any],
    **fields: Any,
) -> dict[str, Any]:
    """A current-layout cfg dict whose sizes and dtype are read off the tensors."""
    d_in, d_sae = tensors["W_enc"].shape
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "dtype": dtype_name(tensors["W_enc"].dtype),
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if tensors["W_dec"].shape[1] != d_in:
        cfg["d_out"] = int(tensors["W_dec"].shape[1])
    cfg.update(fields)
    cfg["metadata"] = {k: v for k, v in metadata.items() if v is not None}
    return cfg


def require(mapping: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    missing = [key for key in keys if key not in mapping]
    if missing:
        raise ValueError(
            f"{where} has no {', '.join(repr(k) for k in missing)} (found {sorted(mapping)})"
        )


#: What a config value may be, by the words an error uses for it.
_KINDS: dict[str, Any] = {
    "an integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "a number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    and math.isfinite(v),
    "a string": lambda v: isinstance(v, str),
    "an object": lambda v: isinstance(v, dict),
    "true or false": lambda v: isinstance(v, bool),
}


def check_types(
    mapping: dict[str, Any], kinds: dict[str, str], where: str, required: tuple[str, ...] = ()
) -> None:
    """Refuse a config value of the wrong kind (`kinds` maps a key to "an integer", "a
    number", "a string", "an object" or "true or false"), naming the file and the key.
    Absent or null keys pass, except those in `required`."""
    for key, kind in kinds.items():
        value = mapping.get(key)
        if value is None and key in required:
            raise ValueError(f"{where}: {key} is missing or null, but it must be {kind}")
        if value is not None and not _KINDS[kind](value):
            raise ValueError(f"{where}: {key} is {value!r}, but it must be {kind}")


def pick(tensors: dict[str, Tensor], where: str, *names: str) -> Tensor:
    """The first of `names` present (layouts spell the same tensor differently)."""
    for name in names:
        if name in tensors:
            return tensors[name]
    raise ValueError(f"{where} has no tensor {' or '.join(names)} (found {sorted(tensors)})")
