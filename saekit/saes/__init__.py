"""SAE architectures. Importing this package registers every built-in architecture."""

from saekit.saes import (  # noqa: F401  (registration)
    clt,
    crosscoder,
    gated,
    groupmax,
    jumprelu,
    standard,
    topk,
    transcoder,
)
from saekit.saes.base import SAE, LossSettings, TrainingOutput
from saekit.saes.registry import architecture_class, list_architectures, register_architecture

#: The architecture `saekit train` trains when none is named.
DEFAULT_ARCHITECTURE = "topk"

__all__ = [
    "DEFAULT_ARCHITECTURE",
    "SAE",
    "LossSettings",
    "TrainingOutput",
    "architecture_class",
    "list_architectures",
    "register_architecture",
]
