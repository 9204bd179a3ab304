"""The tensors an SAE of a given config holds, found without allocating them, and the check
that a file's tensors (often only their header) fit them: loaders call it before reading."""

from __future__ import annotations

from typing import Any

from saekit.config import SAEConfig
from saekit.saes.registry import architecture_class


def unallocated(cfg: SAEConfig) -> Any:
    """An SAE of `cfg` on the meta device: shapes without memory (or random numbers)."""
    cls = architecture_class(cfg.architecture)
    try:
        return cls(cfg.replace(device="meta"))
    except (NotImplementedError, RuntimeError):
        # A user's architecture whose initialisation reads values (`.item()`) cannot be
        # built on the meta device; it is built for real instead.
        return cls(cfg.replace(device="cpu"))


def tensor_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an SAE of `cfg` holds (parameters and buffers) with its shape,
    worked out without allocating it (on the meta device)."""
    return {name: tuple(t.shape) for name, t in unallocated(cfg).state_dict().items()}


def check_tensor_shapes(
    cfg: SAEConfig, shapes: dict[str, tuple[int, ...]], source: str = ""
) -> None:
    """Refuse tensors (by name: shape, e.g. read from a file's header) that an SAE of
    `cfg` cannot take: missing, unexpected or misshapen ones, each named."""
    expected = tensor_shapes(cfg)
    where = f" in {source}" if source else ""
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise ValueError(
            f"tensor(s) {missing} missing{where}; a {cfg.architecture!r} SAE needs "
            f"{sorted(expected)}"
        )
    unexpected = sorted(set(shapes) - set(expected))
    if unexpected:
        raise ValueError(
            f"unexpected tensor(s) {unexpected}{where} for a {cfg.architecture!r} SAE, which "
            f"has {sorted(expected)}; is the cfg.json architecture right?"
        )
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise ValueError(
                f"tensor {name!r}{where} has shape {tuple(shapes[name])} but the config "
                f"(d_in={cfg.d_in}, d_sae={cfg.d_sae}) needs {shape}"
            )
