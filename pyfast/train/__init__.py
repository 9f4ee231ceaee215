"""The training job: build a run, train it, validate it.

    from pyfast.train import build_config, prepare, train
    run = prepare(build_config({"epochs": 2}))     # every input checked before the run dir is written
    summary = train(run)                            # summary.json's dict

Pieces: `config` (fields, flags, YAML), `setup` (data, backbone and features, model and optimizer,
resume), `state` (progress and statistics objects), `step` (`train_step`), `evaluate`
(`validate`), `loop` (the epoch loop), `objective` (the loss), `features` (cache and backbone),
`sharding` (the epoch's order and each rank's share), `distributed` (ranks under torchrun: the
process group, DDP, agreement), `checkpoint`, `guards`, `signals`, `metrics`, `plots`, `summary`.

Under torchrun, `prepare(config)` joins the ranks torchrun started (`World.from_env()`), or pass
`world=` explicitly: `with World.from_env() as world: train(prepare(config, world=world))`.
"""

from pyfast.train.checkpoint import (
    CheckpointError,
    LoadReport,
    load_checkpoint,
    load_state_dict_checked,
    save_checkpoint,
)
from pyfast.train.config import FAST, ConfigError, TrainConfig, build_config, load_yaml
from pyfast.train.distributed import DistributedError, RankFailed, World
from pyfast.train.evaluate import validate
from pyfast.train.features import FeatureError
from pyfast.train.guards import NonFiniteGuard, TrainingDiverged
from pyfast.train.loop import train
from pyfast.train.objective import LossWeights, mask_targets, refiner_loss
from pyfast.train.rundir import RunDirError
from pyfast.train.setup import Run, plan_resume, prepare
from pyfast.train.step import StepResult, train_step
from pyfast.train.summary import format_table

__all__ = [
    "FAST",
    "CheckpointError",
    "ConfigError",
    "DistributedError",
    "FeatureError",
    "LoadReport",
    "LossWeights",
    "NonFiniteGuard",
    "RankFailed",
    "Run",
    "RunDirError",
    "StepResult",
    "TrainConfig",
    "TrainingDiverged",
    "World",
    "build_config",
    "format_table",
    "load_checkpoint",
    "load_state_dict_checked",
    "load_yaml",
    "mask_targets",
    "plan_resume",
    "prepare",
    "refiner_loss",
    "save_checkpoint",
    "train",
    "train_step",
    "validate",
]
