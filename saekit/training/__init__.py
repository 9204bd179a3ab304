"""Training SAEs: the trainer, its configuration, schedules and checkpoints."""

from saekit.training.config import (
    ConfigError,
    DataSection,
    RunSection,
    SAESection,
    TrainConfig,
    TrainingConfig,
)
from saekit.training.trainer import SAEJob, Trainer, TrainingDiverged, TrainResult

__all__ = [
    "ConfigError",
    "DataSection",
    "RunSection",
    "SAEJob",
    "SAESection",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingConfig",
    "TrainingDiverged",
]
