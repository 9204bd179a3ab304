"""saekit: train, evaluate, load, share and analyse sparse autoencoders."""

from saekit.analysis.splice import HookedSAETransformer, SplicedModel
from saekit.config import SAEConfig, SAEMetadata
from saekit.evals import EvalMetrics, evaluate, make_evaluator
from saekit.io.hub import upload_saes_to_huggingface
from saekit.saes import (
    SAE,
    LossSettings,
    TrainingOutput,
    architecture_class,
    list_architectures,
    register_architecture,
)
from saekit.training import TrainConfig
from saekit.training.entry import train

__version__ = "0.1.0"

__all__ = [
    "SAE",
    "EvalMetrics",
    "HookedSAETransformer",
    "LossSettings",
    "SAEConfig",
    "SAEMetadata",
    "SplicedModel",
    "TrainConfig",
    "TrainingOutput",
    "__version__",
    "architecture_class",
    "evaluate",
    "list_architectures",
    "make_evaluator",
    "register_architecture",
    "train",
    "upload_saes_to_huggingface",
]
