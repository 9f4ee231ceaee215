"""The training job: AMP, accumulation, clipping, guards, checkpoints, metrics, plots."""

from pyfast.train.checkpoint import (
    CheckpointError,
    LoadReport,
    load_checkpoint,
    load_state_dict_checked,
    save_checkpoint,
)
from pyfast.train.config import FAST, ConfigError, TrainConfig, build_config, load_yaml
from pyfast.train.guards import NonFiniteGuard, TrainingDiverged
from pyfast.train.loop import Trainer
from pyfast.train.summary import format_table

__all__ = [
    "FAST",
    "CheckpointError",
    "ConfigError",
    "LoadReport",
    "NonFiniteGuard",
    "Trainer",
    "TrainConfig",
    "TrainingDiverged",
    "build_config",
    "format_table",
    "load_checkpoint",
    "load_state_dict_checked",
    "load_yaml",
    "save_checkpoint",
]
