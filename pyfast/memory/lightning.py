"""MemoryMonitorCallback: the MemoryMonitor in a Lightning trainer (`pip install "pyfast[lightning]"`).

    trainer = lightning.pytorch.Trainer(callbacks=[MemoryMonitorCallback(every=10, max_growth=200)])

- samples on train batch end, once per optimizer step (`trainer.global_step`), and logs each
  sample through the trainer's loggers as `memory/<field>`;
- with `max_growth` (MB per 1000 steps), stops the trainer (`trainer.should_stop`) when host,
  worker or CUDA memory grows past it by the leak rule;
- at the end of fitting, writes memory.jsonl / memory.json / memory.png into `out_dir` (default
  the trainer's log_dir, else its default_root_dir), logs the slopes, and reports the verdict
  (a warning when it finds a leak). `pyfast-doctor memory DIR` reads the same files;
- its state (the samples) goes into Lightning checkpoints, so a resumed fit keeps its series.

Each process of a multi-process run keeps its own monitor; rank N > 0 writes its files into a
`memory-rank<N>` subfolder of the output folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

try:
    from lightning.pytorch import Callback
    from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
except ImportError:  # the standalone package works as well
    try:
        from pytorch_lightning import Callback
        from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
    except ImportError as error:
        raise ImportError(
            "pyfast.memory.MemoryMonitorCallback needs Lightning, which is not installed: "
            'pip install "pyfast[lightning]" (or pip install lightning)'
        ) from error

from pyfast.memory.files import clean
from pyfast.memory.monitor import MemoryMonitor
from pyfast.memory.plot import write_memory_plot
from pyfast.memory.report import format_verdict, summarize

_LOGGED = ("rss_mb", "anon_mb", "uss_mb", "workers", "workers_rss_mb", "workers_uss_mb", "fds",
           "cuda_allocated_mb", "cuda_reserved_mb", "cuda_peak_mb")


class MemoryMonitorCallback(Callback):
    """Lightning callback around a `MemoryMonitor` (`callback.monitor`).

    every: sample every N optimizer steps. max_growth: stop the fit when memory grows faster than
    this many MB per 1000 steps (leak rule: confident and sustained); None never stops.
    out_dir: where the files go (default: the trainer's log_dir or default_root_dir).
    log_prefix: prefix of the logged metric names. plot: draw memory.png at the end.
    Other keyword arguments go to MemoryMonitor (rule, investigate, tracemalloc_frames, ...).
    """

    def __init__(self, every: int = 10, *, max_growth: Optional[float] = None, out_dir=None,
                 log_prefix: str = "memory/", plot: bool = True, **monitor_options):
        super().__init__()
        if max_growth is not None and not (isinstance(max_growth, (int, float)) and max_growth > 0):
            raise ValueError(f"max_growth must be a positive number of MB per 1000 steps or None, got {max_growth!r}")
        self.monitor = MemoryMonitor(every, **{"log": rank_zero_warn, **monitor_options})
        self.max_growth = max_growth
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.log_prefix = log_prefix
        self.plot = plot
        self.verdict: Optional[dict] = None
        self.stopped_because: Optional[str] = None
        self._last_step: Optional[int] = None

    def _directory(self, trainer) -> Path:
        base = self.out_dir or Path(trainer.log_dir or trainer.default_root_dir)
        rank = getattr(trainer, "global_rank", 0)
        return base if rank == 0 else base / f"memory-rank{rank}"

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and self.monitor.out_dir is None:
            self.monitor.out_dir = self._directory(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = int(trainer.global_step)
        if step == self._last_step:  # gradient accumulation: several batches per optimizer step
            return
        self._last_step = step
        sample = self.monitor.step(step)
        if sample is None:
            return
        metrics = {f"{self.log_prefix}{k}": float(sample[k]) for k in _LOGGED if sample.get(k) is not None}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if self.max_growth is not None and not trainer.should_stop:
            reason = self.monitor.check(self.max_growth)
            if reason is not None:
                self.stopped_because = reason
                rank_zero_warn(f"pyfast memory: stopping the fit: {reason}")
                trainer.should_stop = True

    def on_fit_end(self, trainer, pl_module) -> None:
        self.verdict = self.monitor.close()
        summary = summarize(self.verdict)
        numbers = {f"{self.log_prefix}{k}": float(v) for k, v in summary.items()
                   if k.endswith("_per_1000_steps") and v is not None}
        numbers[f"{self.log_prefix}leak"] = float(self.verdict["leak"])
        for logger in trainer.loggers:
            logger.log_metrics(numbers, step=int(trainer.global_step))
        if self.plot and self.monitor.out_dir is not None:
            write_memory_plot(self.monitor.samples, self.monitor.out_dir / "memory.png", self.verdict)
        text = format_verdict(self.verdict)
        (rank_zero_warn if self.verdict["leak"] else rank_zero_info)(f"pyfast {text}")

    def state_dict(self) -> dict:
        return clean(self.monitor.state_dict())

    def load_state_dict(self, state_dict: dict) -> None:
        self.monitor.load_state_dict(state_dict)
