"""Readers and checks that the converters for single-file and YAML-configured layouts share."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from torch import Tensor


def read_yaml(file: Path) -> dict[str, Any]:
    """A YAML mapping from `file` (safe loader: no Python objects); errors name the file."""
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid YAML ({err}); the file may be corrupt") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{file} must hold a YAML mapping, found {type(raw).__name__}")
    return raw


def exact_keys(
    stored: Mapping[str, object], required: tuple[str, ...], where: str,
    optional: tuple[str, ...] = (),
) -> None:
    """Refuse a weights file that lacks a tensor or holds one the layout does not define:
    an unknown tensor may change the SAE's function, so it is never dropped silently."""
    missing = [k for k in required if k not in stored]
    if missing:
        raise ValueError(f"{where} has no tensor {', '.join(missing)} (found {sorted(stored)})")
    unknown = sorted(set(stored) - set(required) - set(optional))
    if unknown:
        raise ValueError(
            f"{where} holds tensor(s) {unknown} that this layout does not define (expected "
            f"{sorted(required + optional)}); saekit will not guess what they do"
        )


def check_shape(tensor: Tensor, shape: tuple[int, ...], name: str, where: str) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(
            f"{where}: {name} has shape {list(tensor.shape)}, expected {list(shape)}; the file "
            "is not one SAE of this layout"
        )


def layer_from(name: str, pattern: str, where: str) -> int:
    """The layer number that `pattern`'s first group finds in a file or folder name."""
    match = re.search(pattern, name)
    if match is None:
        raise ValueError(
            f"{where}: cannot read the layer from {name!r} (expected a name matching "
            f"{pattern!r}), so the hook is unknown"
        )
    return int(match.group(1))
