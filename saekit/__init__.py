"""saekit: train, evaluate, load, share and analyse sparse autoencoders."""

from saekit.config import SAEConfig, SAEMetadata
from saekit.saes import (
    SAE,
    LossSettings,
    TrainingOutput,
    architecture_class,
    list_architectures,
    register_architecture,
)

__version__ = "0.1.0"

__all__ = [
    "SAE",
    "LossSettings",
    "SAEConfig",
    "SAEMetadata",
    "TrainingOutput",
    "__version__",
    "architecture_class",
    "list_architectures",
    "register_architecture",
]
