"""saekit: train, evaluate, load, share and analyse sparse autoencoders."""

from saekit.config import SAEConfig, SAEMetadata
from saekit.evals import EvalMetrics, evaluate, make_evaluator
from saekit.saes import (
    SAE,
    LossSettings,
    TrainingOutput,
    architecture_class,
    list_architectures,
    register_architecture,
)
from saekit.training import TrainConfig
from saekit.training.run import train

__version__ = "0.1.0"

__all__ = [
    "SAE",
    "EvalMetrics",
    "LossSettings",
    "SAEConfig",
    "SAEMetadata",
    "TrainConfig",
    "TrainingOutput",
    "__version__",
    "architecture_class",
    "evaluate",
    "list_architectures",
    "make_evaluator",
    "register_architecture",
    "train",
]
