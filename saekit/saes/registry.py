"""Architectures by name. The registry refuses duplicates so a plug-in cannot silently
replace a built-in; users add their own with `@register_architecture("name")`, in a module
they import (`saekit train --import MODULE`) or one an installed package names under the
`saekit.architectures` entry-point group (loaded the first time a name is looked up)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

#: The entry-point group through which installed packages add architectures: each entry
#: names a module that registers its classes, or an SAE subclass to register under the
#: entry's name.
ENTRY_POINT_GROUP = "saekit.architectures"

# Classes are stored untyped so this module need not import the SAE base class (which imports
# this one); every entry is an SAE subclass, since only SAE subclasses are decorated.
_ARCHITECTURES: dict[str, Any] = {}
_plugins_loaded = False

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


def _load_plugins() -> None:
    """Import the architectures installed packages declare (once per process)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry.load()
        except Exception as err:  # noqa: BLE001 - a broken plug-in must not stop saekit
            log.warning("could not load the architecture plug-in %s (%s): %s",
                        entry.name, entry.value, err)
            continue
        if isinstance(loaded, type) and loaded not in _ARCHITECTURES.values():
            register_architecture(entry.name)(loaded)


def import_modules(names: list[str]) -> None:
    """Import each module (a dotted name, importable from the working directory too, or a
    .py file path) so the architectures it registers are known. A user's own code runs:
    only what the user named."""
    import importlib
    import importlib.util
    import os
    import sys

    for name in names:
        if name.endswith(".py"):
            path = Path(name).expanduser().resolve()
            if not path.is_file():
                raise ValueError(f"cannot import {name}: no such file")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            if spec is None or spec.loader is None:
                raise ValueError(f"cannot import {name}: not a Python module")
            if path.stem not in sys.modules:
                module = importlib.util.module_from_spec(spec)
                sys.modules[path.stem] = module
                spec.loader.exec_module(module)
            continue
        if os.getcwd() not in sys.path:  # as `python -m` would find it
            sys.path.append(os.getcwd())
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            raise ValueError(
                f"cannot import module {name!r} ({err}); give a module importable from the "
                "working directory or the Python path, or a .py file"
            ) from None


def architecture_class(name: str) -> Any:
    """The class registered under `name` (case aside when that is unambiguous), or an error
    listing the known names."""
    if name not in _ARCHITECTURES:
        _load_plugins()
    if name in _ARCHITECTURES:
        return _ARCHITECTURES[name]
    folded = [known for known in _ARCHITECTURES if known.lower() == str(name).lower()]
    if len(folded) == 1:
        return _ARCHITECTURES[folded[0]]
    raise ValueError(
        f"unknown SAE architecture {name!r}; known architectures: {', '.join(_ARCHITECTURES)}. "
        "Register new ones with saekit.register_architecture, in a module given to "
        f"--import or named under the {ENTRY_POINT_GROUP!r} entry-point group."
    )


def canonical_architecture(name: str) -> str:
    """The registered spelling of `name` (see `architecture_class`)."""
    return architecture_class(name).architecture


def list_architectures() -> list[str]:
    _load_plugins()
    return list(_ARCHITECTURES)
