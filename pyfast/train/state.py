"""The small stateful objects of a run. Each has `state_dict` / `load_state_dict`, and a checkpoint
is assembled from them (see `pyfast.train.setup.Run.stateful`), so what is saved and what is
restored cannot drift apart.

- `Progress`: where the run is (optimizer steps, epoch, next micro-batch of the epoch).
- `RunStats`: what the run measured, across resumes (time per micro-batch cold and warm, where a
  warm step's time goes, feature-cache lookups, GradScaler skips, wall time of each segment, the
  best and last validation).
- `RngState`: the Python, numpy and torch generators.

State dicts hold only numbers, strings, lists, dicts and tensors, so checkpoints load with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

PHASES = ("data", "features", "forward_loss", "backward", "optimizer")


def _load_dataclass(obj, state: dict) -> None:
    for f in fields(obj):
        if f.name in state:
            setattr(obj, f.name, type(getattr(obj, f.name))(state[f.name]))


@dataclass
class Progress:
    """step: optimizer steps taken; epoch: the current epoch (0-based); micro: the next micro-batch
    of that epoch. The data position only moves at step boundaries."""

    step: int = 0
    epoch: int = 0
    micro: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        _load_dataclass(self, state)


@dataclass
class CacheCounts:
    """Feature-cache lookups. `misses` includes `corrupt` (a damaged entry is recomputed), so the
    hit rate never counts a corrupt entry as a hit."""

    hits: int = 0
    misses: int = 0
    corrupt: int = 0

    def add(self, batch) -> None:
        self.hits += batch.cache_hits
        self.misses += batch.cache_misses
        self.corrupt += batch.cache_corrupt

    @property
    def lookups(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.lookups if self.lookups else None


@dataclass
class PhaseStats:
    """One phase of the run: cold (epoch 1, which fills the cache) or warm (every later epoch)."""

    seconds: float = 0.0
    micro_batches: int = 0
    cache: CacheCounts = field(default_factory=CacheCounts)

    @property
    def s_per_batch(self) -> float | None:
        return self.seconds / self.micro_batches if self.micro_batches else None


@dataclass
class StepTimes:
    """Seconds spent in each part of optimizer steps (host-side times: on CUDA, work is timed where
    the host waits for it)."""

    data: float = 0.0
    features: float = 0.0
    forward_loss: float = 0.0
    backward: float = 0.0
    optimizer: float = 0.0

    def add(self, other: "StepTimes") -> None:
        for name in PHASES:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def total(self) -> float:
        return sum(getattr(self, name) for name in PHASES)

    def shares(self) -> dict | None:
        total = self.total
        return {name: getattr(self, name) / total for name in PHASES} if total else None


@dataclass
class RunStats:
    cold: PhaseStats = field(default_factory=PhaseStats)
    warm: PhaseStats = field(default_factory=PhaseStats)
    warm_steps: StepTimes = field(default_factory=StepTimes)
    scaler_skips: int = 0  # steps the fp16 GradScaler skipped (finite loss, inf gradient)
    segments: list = field(default_factory=list)  # wall seconds of each process that worked on the run
    best_val_iou: float | None = None
    last_val: dict = field(default_factory=dict)

    def phase(self, epoch: int) -> PhaseStats:
        return self.cold if epoch == 0 else self.warm

    @property
    def corrupt(self) -> int:
        return self.cold.cache.corrupt + self.warm.cache.corrupt

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for name in ("cold", "warm"):
            phase = state[name]
            setattr(self, name, PhaseStats(float(phase["seconds"]), int(phase["micro_batches"]), CacheCounts(**phase["cache"])))
        self.warm_steps = StepTimes(**state["warm_steps"])
        self.scaler_skips = int(state["scaler_skips"])
        self.segments = [float(s) for s in state["segments"]]
        best = state["best_val_iou"]
        self.best_val_iou = None if best is None else float(best)
        self.last_val = dict(state["last_val"])


class RngState:
    """The Python, numpy and torch (CPU and CUDA) random generators, as plain data."""

    def state_dict(self) -> dict:
        version, mt, gauss = random.getstate()
        name, keys, pos, has_gauss, cached = np.random.get_state()
        return {
            "python": [version, list(mt), gauss],
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, state: dict) -> None:
        version, mt, gauss = state["python"]
        random.setstate((int(version), tuple(int(v) for v in mt), gauss))
        n = state["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
        torch.set_rng_state(state["torch"].cpu())
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
