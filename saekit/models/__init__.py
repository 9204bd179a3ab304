"""Model backends: token batches in, activations at named hooks out.

`load_model` turns a name or a model object into a `ModelBackend`; the backend classes
themselves (`HFBackend`, `TransformerLensBackend`) import their libraries only when used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from saekit.models.backend import ModelBackend, Replacement
from saekit.models.hooks import replace_head, select_head
from saekit.models.loading import load_model

if TYPE_CHECKING:
    from saekit.models.hf import HFBackend
    from saekit.models.tl import TransformerLensBackend

__all__ = [
    "HFBackend",
    "ModelBackend",
    "Replacement",
    "TransformerLensBackend",
    "load_model",
    "replace_head",
    "select_head",
]


def __getattr__(name: str) -> Any:
    if name == "HFBackend":
        from saekit.models.hf import HFBackend

        return HFBackend
    if name == "TransformerLensBackend":
        from saekit.models.tl import TransformerLensBackend

        return TransformerLensBackend
    raise AttributeError(f"module 'saekit.models' has no attribute {name!r}")
