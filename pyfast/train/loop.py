"""The training loop.

    run = prepare(config)                   # pyfast.train.setup: everything built and checked
    summary = train(run)                    # trains, validates, checkpoints; summary.json's dict

An epoch: a DataLoader over this rank's batches of the epoch (from the saved position when
resuming), one `train_step` per `accumulate` micro-batches, a record per step in metrics.jsonl,
then validation, the best checkpoint and `last.pt`. Ctrl-C / SIGTERM stop after the current step;
whatever ends the run, `last.pt`, summary.json and the plots are written.

With several ranks every rank runs this loop in lockstep: the step's control all-reduce gives each
the same totals, stop request and failures (`pyfast.train.distributed`), and rank 0 alone writes
metrics, checkpoints, the summary and the plots. Rank-local work between two steps (loading a
batch, rank 0's writes) runs in `world.attempt`, so that its failure stops every rank at the next
step instead of leaving the others waiting.

The memory monitor (`run.memory`, pyfast.train.memory) samples after every optimizer step; its
samples go into the step's record, its verdict into summary.json and plots/memory.png. With
--max-memory-growth, growth past the bound stops the run after the step, checkpoint saved.
"""

from __future__ import annotations

import contextlib
import signal
import time
from typing import Optional

import torch

from pyfast.memory import write_memory_plot
from pyfast.train.distributed import RankFailed, agreed, everywhere
from pyfast.train.evaluate import validate
from pyfast.train.memory import STOPPED_BY
from pyfast.train.metrics import MetricsLog
from pyfast.train.plots import write_plots
from pyfast.train.signals import GracefulStop
from pyfast.train.state import StepTally, StepTimes
from pyfast.train.step import LossHook, train_step
from pyfast.train.summary import summarize, write_summary


def train(run, *, loss_hook: LossHook = None, progress_bar: Optional[bool] = None, started: Optional[float] = None) -> dict:
    """Train `run` until its epochs or --max-steps are done, a signal stops it or it fails.

    Returns summary.json's dict; `summary["stopped_by"]` names the signal that stopped it, or
    "max_memory_growth" when memory grew past --max-memory-growth. An exception (diverged, too many
    bad samples, bad features, another rank failed) is raised after the checkpoint, summary and
    plots are written. `started`: when this process began working on the run (perf_counter;
    default: now), for the wall time of this segment.
    """
    world = run.world
    clock = Clock(run, started)
    status, error = "completed", None
    with GracefulStop(alone=world.size == 1, second_interrupt_raises=not world.launched) as stop, \
            denormals_flushed(run.device):
        try:
            with _metrics_log(run) as metrics:
                fit(run, metrics, stop, clock, loss_hook, progress_bar)
            world.agree()  # a failure kept after the last step (rank 0's last writes)
            if stop.signal:
                status = f"interrupted ({stop.name})"
            elif run.memory.stop_reason:
                status = "stopped: memory growth"
            elif run.stats.last_val.get("val_nonfinite_boxes"):
                status = "diverged"
        except BaseException as exc:  # diverged, too many bad samples, Ctrl-C twice: save what we have
            status, error = _failed(exc), exc
            if world.size > 1 and not agreed(exc):  # raised on this rank alone: others may wait in a collective
                world.broken = True
        finally:
            verdict = None
            try:
                # An interrupted or failed run must not wait for a search for growers under way.
                verdict = run.memory.finish(wait=error is None and not stop.requested)
                clock.save("last")  # the monitor's samples and searches go into the checkpoint
            finally:
                summary = summarize(run, status)
                summary["stopped_by"] = stop.name or (STOPPED_BY if run.memory.stop_reason else None)
                if world.is_main:
                    write_summary(run.paths.summary, summary)
                    write_plots(run.paths.path)
                    write_memory_plot(run.memory.monitor.samples, run.paths.plots / "memory.png", verdict)
    if error is not None:
        raise error
    return summary


def _failed(error: BaseException) -> str:
    if isinstance(error, RankFailed):
        return f"failed: {error.kind} on rank {error.rank}"
    return f"failed: {type(error).__name__}"


class _NoLog:
    """What ranks other than 0 write their metrics to."""

    def write(self, record: dict, prefix: str = "train") -> None:
        pass


def _metrics_log(run):
    if run.world.is_main:
        return MetricsLog(run.paths.metrics, tensorboard_dir=run.paths.tensorboard, log=run.log)
    return contextlib.nullcontext(_NoLog())


@contextlib.contextmanager
def denormals_flushed(device: torch.device):
    """Float32 subnormals flushed to zero on the CPU while the run trains, as they were afterwards.

    As the heads sharpen, softmax and sigmoid tails fall into float32's subnormal range, where x86
    arithmetic is many times slower (measured: 0.44 -> 0.05 s/batch warm for --fast). The flush is
    deterministic, so resumed runs stay exact; it is process-wide, so it is undone when the run ends
    for the code that called it.
    """
    if device.type != "cpu":
        yield
        return
    was_flushing = (torch.full((1,), 1e-39) * 0.5).item() == 0.0  # torch has no getter for it
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was_flushing)


class Clock:
    """The wall time of this segment of the run, kept in RunStats.segments up to date at each save."""

    def __init__(self, run, started: Optional[float]):
        self.run, self.started = run, started if started is not None else time.perf_counter()
        run.stats.segments.append(0.0)

    def save(self, name: str):
        self.run.stats.segments[-1] = time.perf_counter() - self.started
        return self.run.save(name)


def _next_batches(loader, count: int) -> list:
    return [next(loader) for _ in range(count)]


def fit(run, metrics: MetricsLog, stop: GracefulStop, clock: Clock, loss_hook: LossHook, progress_bar) -> None:
    cfg, data, progress, stats, world = run.cfg, run.data, run.progress, run.stats, run.world
    validated_at = stats.last_val.get("step")

    def stopping() -> bool:
        return (bool(stop.signal) or run.memory.stop_reason is not None
                or (cfg.max_steps is not None and progress.step >= cfg.max_steps))

    while progress.epoch < cfg.epochs and not stopping():
        epoch = progress.epoch
        phase = stats.phase(epoch)
        loader = world.attempt(lambda: iter(data.loader(data.epoch_batches(epoch)[progress.micro :])))
        bar = _progress(run.steps_per_epoch, progress.micro // cfg.accumulate, f"epoch {epoch + 1}/{cfg.epochs}",
                        progress_bar if world.is_main else False)
        while progress.micro < data.micro_per_epoch and not stopping():
            count = min(cfg.accumulate, data.micro_per_epoch - progress.micro)
            times, started = StepTimes(), time.perf_counter()
            batches = world.attempt(_next_batches, loader, count, default=[])
            times.data = time.perf_counter() - started
            tally = StepTally.of(batches)
            tally.request_stop(stop.requested)
            result = train_step(run, batches, epoch, times, loss_hook, tally)  # tally: now every rank's totals
            stop.agreed = stop.agreed or tally.stop_signal
            progress.micro += count  # the data position only moves at step boundaries
            phase.cache.add(tally)
            stats.backbone_samples += tally.backbone
            if result is None:  # every sample of the step was skipped or had no box
                continue
            progress.step += 1
            seconds = time.perf_counter() - started
            phase.seconds += seconds
            phase.micro_batches += count
            phase.samples += tally.samples
            if epoch > 0:
                stats.warm_steps.add(times)
            lookups = tally.cache_hits + tally.cache_misses
            memory = run.memory.after_step(progress.step)  # a sample every --memory-every steps, else None
            if world.size > 1 and cfg.max_memory_growth is not None:  # every rank stops at the same step
                reasons = [reason for reason in world.all_gather(run.memory.stop_reason) if reason]
                run.memory.stop_reason = reasons[0] if reasons else None
            world.attempt(metrics.write, {
                "step": progress.step, "epoch": epoch + 1, "loss": result.loss, "parts": result.parts, "lr": result.lr,
                "grad_norm": result.grad_norm, "s_per_batch": seconds / count,
                "cache_hit_rate": tally.cache_hits / lookups if lookups else None,
                "iou_input": result.iou_input, "iou_refined": result.iou_refined, "skipped_step": not result.applied,
                **({"memory": memory} if memory is not None else {}),
            })  # fmt: skip
            bar.update(1)
            bar.set_postfix({"s/batch": f"{seconds / count:.3f}", "loss": f"{result.loss:.4f}"}, refresh=False)
            if not result.applied:
                # every rank skips this step (`applied` was agreed), so every rank can name its samples
                samples = "; ".join(s for s in run.world.all_gather(result.samples) if s)
                run.log(f"step {progress.step}: non-finite loss or gradient, step skipped; its samples: {samples}")
            with everywhere():  # the same decision on every rank: `applied` was agreed
                run.guard.update(result.applied, progress.step)
            if run.memory.stop_reason is not None:
                run.log(f"stopping: {run.memory.stop_reason} (--max-memory-growth); checkpoint saved")
                break
            if cfg.checkpoint_every and progress.step % cfg.checkpoint_every == 0:
                world.attempt(clock.save, "last")
        bar.close()
        if progress.micro >= data.micro_per_epoch:
            validate_and_record(run, clock)
            validated_at = progress.step
            progress.epoch += 1
            progress.micro = 0
            world.attempt(clock.save, "last")
    if validated_at != progress.step and not stop.signal and run.memory.stop_reason is None:
        validate_and_record(run, clock)


def validate_and_record(run, clock: Clock) -> dict:
    """Validate (every rank, each its share), append to val.jsonl, keep the best checkpoint (by the
    refined boxes' IoU, which every rank knows; never a model whose boxes went non-finite)."""
    result = validate(run)
    record = {"step": run.progress.step, "epoch": run.progress.epoch, **result, "memory": run.memory.latest()}
    run.stats.last_val = record
    if run.world.is_main:
        run.world.attempt(_append_validation, run, record)
    best = run.stats.best_val_iou
    if not result["val_nonfinite_boxes"] and (best is None or result["val_iou_refined"] > best):
        run.stats.best_val_iou = result["val_iou_refined"]
        run.world.attempt(clock.save, "best")
    return record


def _append_validation(run, record: dict) -> None:
    with MetricsLog(run.paths.val) as log:
        log.write(record)


EXIT_MEMORY_GROWTH = 3  # --max-memory-growth stopped the run


def exit_code(summary: dict) -> int:
    """128 + the signal number for a run stopped by a signal, 3 for one stopped by
    --max-memory-growth, else 0."""
    name = summary.get("stopped_by")
    if name == STOPPED_BY:
        return EXIT_MEMORY_GROWTH
    return 128 + int(signal.Signals[name]) if name else 0


def _progress(total: int, initial: int, desc: str, enabled: Optional[bool]):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", leave=False,
                disable=None if enabled is None else not enabled, dynamic_ncols=True)
