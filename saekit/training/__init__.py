"""Training SAEs: the trainer, its configuration, schedules and checkpoints."""

from saekit.training.config import (
    ConfigError,
    DataSection,
    RunSection,
    SAESection,
    TrainConfig,
    TrainingConfig,
    TrainingSection,
)
from saekit.training.trainer import FitResult, SAEJob, Trainer, TrainingDiverged

__all__ = [
    "ConfigError",
    "DataSection",
    "FitResult",
    "RunSection",
    "SAEJob",
    "SAESection",
    "TrainConfig",
    "Trainer",
    "TrainingConfig",
    "TrainingDiverged",
    "TrainingSection",
]
