"""Architectures by name. The registry refuses duplicates so a plug-in cannot silently
replace a built-in; users add their own with `@register_architecture("name")`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

# Classes are stored untyped so this module need not import the SAE base class (which imports
# this one); every entry is an SAE subclass, since only SAE subclasses are decorated.
_ARCHITECTURES: dict[str, Any] = {}

SAEClass = TypeVar("SAEClass", bound=type)


def register_architecture(name: str) -> Callable[[SAEClass], SAEClass]:
    """Class decorator: make `name` loadable and constructible from a config."""

    def decorate(cls: SAEClass) -> SAEClass:
        if name in _ARCHITECTURES:
            raise ValueError(
                f"architecture {name!r} is already registered "
                f"(by {_ARCHITECTURES[name].__name__}); pick another name"
            )
        cls.architecture = name
        _ARCHITECTURES[name] = cls
        return cls

    return decorate


def architecture_class(name: str) -> Any:
    """The class registered under `name`, or an error listing the known names."""
    try:
        return _ARCHITECTURES[name]
    except KeyError:
        raise ValueError(
            f"unknown SAE architecture {name!r}; known architectures: {', '.join(_ARCHITECTURES)}. "
            "Register new ones with saekit.register_architecture."
        ) from None


def list_architectures() -> list[str]:
    return list(_ARCHITECTURES)
