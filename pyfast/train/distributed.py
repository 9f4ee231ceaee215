"""Training over several processes under PyTorch's launcher, torchrun.

    with World.from_env() as world:            # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT (torchrun's)
        run = prepare(config, world=world)       # every rank checks its inputs; rank 0 alone writes
        summary = train(run)

World size 1, a plain `pyfast-train` or torchrun with one process, is the same code with no process
group and no DDP wrapper: every collective here returns at once and an error raises where it
happens. With several ranks:

- The process group is gloo on CPU. With CUDA it is "cpu:gloo,cuda:nccl": tensors on the GPU go
  through NCCL, the few Python objects (start-up, failures, skipped-sample records, validation
  boxes) through gloo. Each rank uses the GPU of its LOCAL_RANK.
- Every collective has the run's timeout (`--dist-timeout`): a rank that stops answering makes the
  others fail after that long instead of waiting forever, and torchrun ends the remaining processes
  once one of them exits with an error. A collective that fails marks the world `broken`: nothing
  more is sent, and the processes exit with an error.
- Agreement points. A failure on one rank (a bad feature, a data loader that dies, a full disk
  under rank 0) must not leave the others blocked in the next collective. Rank-local work runs in
  `attempt`, which keeps the first exception instead of raising it; the next agreement (the
  training step's control all-reduce carries a "failed" count; `agree` gathers the errors) raises
  on every rank together: the failing rank its own error, the others `RankFailed` naming it. So
  every rank stops at the same step, and rank 0 writes one checkpoint.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import os
import pickle
import signal
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

DEFAULT_TIMEOUT_S = 600.0
_AGREED = "_pyfast_agreed"


class DistributedError(RuntimeError):
    """A launch that cannot work (torchrun's environment incomplete or inconsistent), or a collective
    that failed: another process died or stopped answering."""


class RankFailed(RuntimeError):
    """Another rank failed; this one stops with it, at the same point. `rank`, `kind` (the exception
    class) and `message` describe the first failing rank."""

    def __init__(self, rank: int, kind: str, message: str, others: int = 0):
        more = f" (and {others} more rank{'s' if others > 1 else ''})" if others else ""
        super().__init__(f"rank {rank} failed{more}: {kind}: {message}")
        self.rank, self.kind, self.message = rank, kind, message
        setattr(self, _AGREED, True)


def agreed(error: BaseException) -> bool:
    """Whether every rank raised `error` (or RankFailed for it) together at an agreement point."""
    return bool(getattr(error, _AGREED, False))


def _mark_agreed(error: BaseException) -> BaseException:
    try:
        setattr(error, _AGREED, True)
    except AttributeError:  # an exception type without a __dict__
        pass
    return error


@contextlib.contextmanager
def everywhere():
    """Around code that runs on values every rank agreed on (the step's totals, merged records):
    it raises on every rank alike, so its exception counts as agreed."""
    try:
        yield
    except BaseException as error:
        _mark_agreed(error)
        raise


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _env_int(environ, name: str, default: Optional[int]) -> Optional[int]:
    text = environ.get(name)
    if text is None or text.strip() == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise DistributedError(f"{name}={text!r} is not an integer (torchrun sets it)") from None


@dataclass
class World:
    """Who this process is among the ranks of a run, and the collectives of the run.

    rank, size: RANK and WORLD_SIZE; local_rank: LOCAL_RANK, the GPU this rank uses on its machine;
    launched: started by torchrun (even with one process). `pending` holds a rank-local failure until
    the next agreement; `broken` says a collective failed and the group must not be used again.
    `ddp`: the DistributedDataParallel wrapper of the run (`wrap_model`'s), which `close` releases.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launched: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S
    started: bool = False
    broken: bool = False
    pending: Optional[Exception] = None
    group: Any = None  # the process group of the run's collectives (None: the default group)
    ddp: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def from_env(cls, environ=None) -> "World":
        """The world torchrun describes in the environment; a process started without it is rank 0 of 1."""
        env = os.environ if environ is None else environ
        size = _env_int(env, "WORLD_SIZE", 1)
        rank = _env_int(env, "RANK", 0)
        local_rank = _env_int(env, "LOCAL_RANK", None)
        if size < 1:
            raise DistributedError(f"WORLD_SIZE={size}: it must be at least 1")
        if not 0 <= rank < size:
            raise DistributedError(f"RANK={rank} is outside WORLD_SIZE={size}")
        if size > 1 and local_rank is None:
            raise DistributedError(f"WORLD_SIZE={size} without LOCAL_RANK: launch with torchrun, which sets RANK, "
                                   "LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT")
        launched = "TORCHELASTIC_RUN_ID" in env or size > 1
        return cls(rank=rank, size=size, local_rank=local_rank or 0, launched=launched)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __enter__(self) -> "World":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------ process group

    def start(self, timeout_s: Optional[float] = None) -> "World":
        """Join the process group with `timeout_s` for its collectives (several ranks only; a no-op once
        started: `set_timeout` changes it then)."""
        if self.started:
            return self
        if timeout_s is not None:
            self.timeout_s = float(timeout_s)
        if self.size == 1:
            return self
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise DistributedError(f"WORLD_SIZE={self.size} but {' and '.join(missing)} not set: launch with torchrun")
        cuda = torch.cuda.is_available()
        if cuda and self.local_rank < torch.cuda.device_count():
            torch.cuda.set_device(self.local_rank)  # NCCL's communicator and every CUDA tensor of this rank
        try:
            dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", rank=self.rank, world_size=self.size,
                                    timeout=timedelta(seconds=self.timeout_s))
        except Exception as error:
            raise DistributedError(f"the process group did not start: {one_line(error)}") from error
        self.started = True
        return self

    def set_timeout(self, timeout_s: float) -> None:
        """Use `timeout_s` for the run's collectives from now on (every rank calls this at the same point)."""
        if float(timeout_s) == self.timeout_s:
            return
        self.timeout_s = float(timeout_s)
        if self.started:
            self.group = self.collective("creating the run's process group", dist.new_group,
                                    timeout=timedelta(seconds=self.timeout_s))

    def close(self) -> None:
        """Leave the process group: once every rank is here (unless a collective failed), so that no rank
        exits, and makes torchrun end the others, while rank 0 is still writing the run's files.

        Then, in this order: DDP's wrapper and its reducer are released (the reducer holds the run's
        group), the run's own group is destroyed, then the default group. Gloo's destructor joins its
        worker threads while this thread holds the GIL, so nothing may be left for a worker to free
        that needs the GIL: no group may die later, at an arbitrary garbage collection or at
        interpreter exit, and the barrier's tensor stays referenced here until the groups are gone
        (a tensor whose Python object died while a gloo work still held it is freed by that worker,
        under the GIL)."""
        if not self.started:
            self.ddp = None
            return
        if threading.current_thread() is threading.main_thread():
            # From here on this process only leaves. When another rank leaves first, torchrun sends the
            # rest SIGTERM: it must not cut short an exit whose code already says how the run ended.
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, signal.SIG_IGN)
        barrier = torch.zeros(1)
        try:
            if not self.broken:
                self.all_reduce(barrier)  # a barrier over gloo, whatever the device
        except DistributedError:
            pass
        finally:
            self.ddp = None
            gc.collect()  # DDP's module and hooks refer to each other: free the reducer, and its group, now
            group, self.group = self.group, None
            for pg in ([group] if group is not None else []) + [None]:
                try:
                    dist.destroy_process_group(pg)
                except Exception:  # a broken group may not tear down cleanly; the process is ending anyway
                    pass
            del group
            self.started = False
        del barrier

    # -------------------------------------------------------------------------------- collectives

    def collective(self, what: str, fn: Callable, *args, **kwargs):
        """`fn(*args, **kwargs)`, which talks to the other ranks (DDP's synced backward included). Any
        failure means the ranks no longer run the same collectives: the world is marked broken and
        the error becomes a DistributedError saying which step of the protocol failed."""
        try:
            return fn(*args, **kwargs)
        except Exception as error:
            self.broken = True
            raise DistributedError(
                f"{what} failed: another process died or did not answer within "
                f"--dist-timeout {self.timeout_s:g} s ({type(error).__name__}: {one_line(error)})"
            ) from error

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place."""
        if self.size > 1:
            self.collective("an all-reduce", dist.all_reduce, tensor, group=self.group)
        return tensor

    def sum_and_read(self, summed: torch.Tensor, counts: list, local: Optional[torch.Tensor] = None):
        """One host read of three things: `summed` (float64 on the run's device) and `counts` (numbers
        this rank counted on the host) summed over the ranks, and `local` (float64 on the device, this
        rank's alone). Returns three lists. On CUDA the counts travel in a pinned buffer, so the read
        at the end is the only synchronization."""
        host = torch.tensor([float(v) for v in counts], dtype=torch.float64)
        n, k = summed.numel(), host.numel()
        if self.size == 1:
            values = (torch.cat([summed, local]) if local is not None else summed).tolist()
            return values[:n], values[n:], host.tolist()
        if summed.device.type == "cuda":
            host = host.pin_memory().to(summed.device, non_blocking=True)
        vector = self.all_reduce(torch.cat([summed, host.to(summed.device)]))
        values = (torch.cat([vector, local]) if local is not None else vector).tolist()
        return values[:n], values[n + k :], values[n : n + k]

    def all_gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        self.collective("gathering", dist.all_gather_object, out, obj, group=self.group)
        return out

    def gather(self, obj) -> Optional[list]:
        """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size if self.rank == 0 else None
        self.collective("gathering", dist.gather_object, obj, out, dst=0, group=self.group)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.size == 1:
            return obj
        box = [obj if self.rank == 0 else None]
        self.collective("a broadcast", dist.broadcast_object_list, box, src=0, group=self.group)
        return box[0]

    # ---------------------------------------------------------------------------------- agreement

    def attempt(self, fn: Callable, *args, default=None):
        """Rank-local work between two agreement points. With one rank: `fn(*args)`. Otherwise an
        exception is kept in `pending` (and `default` returned) to be raised on every rank at the next
        agreement; once one is pending, further local work is skipped until then."""
        if self.size == 1:
            return fn(*args)
        if self.pending is not None:
            return default
        try:
            return fn(*args)
        except Exception as error:
            if self.broken:  # a collective failed inside: there is no agreement left to wait for
                raise
            self.pending = error
            return default

    def agree(self, error: Optional[BaseException] = None) -> None:
        """An agreement point (every rank calls it): when any rank failed since the last one (`error`,
        or the pending failure), every rank raises, the failing one its own error and the others
        RankFailed naming the first failing rank."""
        error = error if error is not None else self.pending
        self.pending = None
        if self.size == 1:
            if error is not None:
                raise error
            return
        reports = self.all_gather(None if error is None else (type(error).__name__, one_line(error)))
        failed = [(rank, report) for rank, report in enumerate(reports) if report is not None]
        if not failed:
            return
        if error is not None:
            raise _mark_agreed(error)
        rank, (kind, message) = failed[0]
        raise RankFailed(rank, kind, message, len(failed) - 1)

    def on_main(self, fn: Callable[[], Any]):
        """`fn()` run on rank 0 alone, its result (or its exception) on every rank."""
        if self.size == 1:
            return fn()
        outcome = None
        if self.rank == 0:
            try:
                outcome = (True, fn())
            except Exception as error:
                try:
                    pickle.dumps(error)
                except Exception:
                    error = RuntimeError(f"{type(error).__name__}: {one_line(error)}")
                outcome = (False, _mark_agreed(error))
        ok, value = self.broadcast(outcome)
        if ok:
            return value
        raise _mark_agreed(value)


# ------------------------------------------------------------------------------------------- DDP


class StepModule(nn.Module):
    """The model as DDP sees it during training: `(maps, boxes, index) -> RefinerOutput`, or, with
    `maps=None`, a zero that every parameter's gradient flows from. A rank with nothing to learn from
    in a step (an empty part of the epoch's last slot, a batch of skipped samples, a failure) still
    joins the step's gradient all-reduce, with zeros, so the ranks never wait on each other."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, maps, boxes=None, index=None):
        if maps is None:
            return sum(p.sum() for p in self.model.parameters()) * 0.0
        return self.model(maps, boxes, index)


def wrap_model(model: nn.Module, world: World, device: torch.device) -> Optional[DistributedDataParallel]:
    """DDP over `model` (None with one rank: no wrapper, no overhead), kept as `world.ddp` until
    `world.close()` releases it. The heads' buffers are constants, so they are not broadcast at
    every forward."""
    if world.size == 1:
        return None
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    quiet_buffers = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    world.ddp = world.collective(
        "wrapping the model in DistributedDataParallel", DistributedDataParallel, StepModule(model),
        device_ids=[device.index] if device.type == "cuda" else None, process_group=world.group, **quiet_buffers,
    )
    return world.ddp
