"""The small stateful objects of a run. Each has `state_dict` / `load_state_dict`, and a checkpoint
is assembled from them (see `pyfast.train.setup.Run.stateful`), so what is saved and what is
restored cannot drift apart.

- `Progress`: where the run is (optimizer steps, epoch, next micro-batch of the epoch).
- `RunStats`: what the run measured, across resumes (time per micro-batch cold and warm, samples
  trained on, where a warm step's time goes, feature-cache lookups, samples through the backbone,
  GradScaler skips, wall time of each segment, the best and last validation). With several ranks
  the counts are totals over the ranks (each step's control all-reduce sums them) and the times are
  rank 0's: the ranks run in lockstep.
- `StepTally`: one rank's host-side counts of one step, which that all-reduce sums.
- `RngState`: the Python, numpy and torch generators.

State dicts hold only numbers, strings, lists, dicts and tensors, so checkpoints load with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import random
import signal
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
    micro_batches: int = 0  # micro-batch slots: with W ranks, each is W batches, one per rank
    cache: CacheCounts = field(default_factory=CacheCounts)
    samples: int = 0  # samples trained on, over every rank

    @property
    def s_per_batch(self) -> float | None:
        return self.seconds / self.micro_batches if self.micro_batches else None

    @property
    def samples_per_s(self) -> float | None:
        return self.samples / self.seconds if self.seconds and self.samples else None


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
    backbone_samples: int = 0  # samples whose features the backbone computed (cache misses), every rank
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
            setattr(self, name, PhaseStats(float(phase["seconds"]), int(phase["micro_batches"]), CacheCounts(**phase["cache"]),
                                           int(phase.get("samples", 0))))
        self.warm_steps = StepTimes(**state["warm_steps"])
        self.scaler_skips = int(state["scaler_skips"])
        self.backbone_samples = int(state.get("backbone_samples", 0))
        self.segments = [float(s) for s in state["segments"]]
        best = state["best_val_iou"]
        self.best_val_iou = None if best is None else float(best)
        self.last_val = dict(state["last_val"])


@dataclass
class StepTally:
    """One rank's host-side counts of one step (or of a validation), summed over the ranks by the
    step's control all-reduce so that every rank sees, and records, the same totals.

    The cache fields are named like a Batch's, so `CacheCounts.add` takes a tally too. sigint /
    sigterm: stop requests this rank received; failed: this rank has a failure pending. `records`
    (the step's skipped-sample records) is not summed: when any rank has some, they are gathered.
    """

    cache_hits: int = 0
    cache_misses: int = 0
    cache_corrupt: int = 0
    samples: int = 0
    skipped: int = 0
    backbone: int = 0
    sigint: int = 0
    sigterm: int = 0
    failed: int = 0
    records: list = field(default_factory=list)

    COUNTS = ("cache_hits", "cache_misses", "cache_corrupt", "samples", "skipped", "backbone", "sigint", "sigterm", "failed")

    @classmethod
    def of(cls, batches) -> "StepTally":
        tally = cls()
        for batch in batches:
            tally.add_batch(batch)
        return tally

    def add_batch(self, batch) -> None:
        self.cache_hits += batch.cache_hits
        self.cache_misses += batch.cache_misses
        self.cache_corrupt += batch.cache_corrupt
        self.samples += len(batch)
        self.records.extend(batch.skipped)
        self.skipped += len(batch.skipped)

    def request_stop(self, signum: int | None) -> None:
        if signum == signal.SIGINT:
            self.sigint = 1
        elif signum:
            self.sigterm = 1

    def counts(self) -> list:
        return [getattr(self, name) for name in self.COUNTS]

    def set_counts(self, values) -> None:
        for name, value in zip(self.COUNTS, values):
            setattr(self, name, int(value))

    @property
    def stop_signal(self) -> int | None:
        """The stop the ranks agree on: SIGTERM when any rank got one, else SIGINT, else None."""
        return int(signal.SIGTERM) if self.sigterm else int(signal.SIGINT) if self.sigint else None


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
