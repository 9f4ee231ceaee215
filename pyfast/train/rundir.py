"""The run directory: what it holds, and the checks made before anything is written to it.

    RUN_DIR/config.yaml            the settings of the run (rewritten on an accepted --resume)
    RUN_DIR/metrics.jsonl          one JSON object per optimizer step
    RUN_DIR/val.jsonl              one per validation
    RUN_DIR/checkpoints/last.pt    model, optimizer, scheduler, scaler, RNG, progress, statistics
    RUN_DIR/checkpoints/best.pt    the same, at the best validation IoU of the refined boxes
    RUN_DIR/summary.json, plots/, skipped.jsonl, cache/ (the default feature cache), tensorboard/

The directory is created only once every input of the run has been checked (`pyfast.train.setup`):
a start that fails leaves nothing behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path


class RunDirError(ValueError):
    """A run directory that cannot be used."""


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def val(self) -> Path:
        return self.path / "val.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def skipped(self) -> Path:
        return self.path / "skipped.jsonl"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def cache(self) -> Path:
        return self.path / "cache"

    def holds_run(self) -> bool:
        """Whether a run already lives here (its config, metrics or checkpoints)."""
        return any(p.exists() for p in (self.config, self.metrics, self.checkpoints))


def default_run_dir() -> Path:
    base = Path("runs") / ("train-" + datetime.now().strftime("%Y%m%d-%H%M%S"))
    path, n = base, 2
    while RunDir(path).holds_run():  # two runs started in the same second
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    return path
