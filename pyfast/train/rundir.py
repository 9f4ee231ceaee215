"""The run directory: what it holds, and the checks made before anything is written to it.

    RUN_DIR/config.yaml            the settings of the run (rewritten on an accepted --resume)
    RUN_DIR/metrics.jsonl          one JSON object per optimizer step
    RUN_DIR/val.jsonl              one per validation
    RUN_DIR/checkpoints/last.pt    model, optimizer, scheduler, scaler, RNG, progress, statistics
    RUN_DIR/checkpoints/best.pt    the same, at the best validation IoU of the refined boxes
    RUN_DIR/summary.json, plots/, skipped.jsonl, cache/ (the default feature cache), tensorboard/

The directory is created only once every input of the run has been checked (`pyfast.train.setup`),
`check_writable` included: a start that fails leaves nothing behind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path


class RunDirError(ValueError):
    """A run directory that cannot be used: not writable, or already holding another run."""


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


def check_writable(path, what: str) -> None:
    """Raises RunDirError unless `path` is a writable folder or can be created as one.

    Checks the path itself when it exists, else its nearest existing ancestor; nothing is created.
    (Permission bits do not stop root; a read-only file system or a file in the way do.)
    """
    path = Path(os.path.abspath(path))
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        where = "is" if probe == path else f"lies under {probe}, which is"
        raise RunDirError(f"{what} {os.fspath(path)!r} {where} not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunDirError(f"{what} {os.fspath(path)!r} is not writable ({probe} is read-only for this user or file system)")


def check_files_writable(paths, what: str) -> None:
    """Raises RunDirError if any existing file in `paths` cannot be written (a resumed run appends to its logs)."""
    for path in paths:
        if Path(path).exists() and not os.access(path, os.W_OK):
            raise RunDirError(f"{what}: {os.fspath(path)!r} is not writable")
