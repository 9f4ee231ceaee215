"""Building a run: every input validated first, the run directory touched last.

    config, checkpoint = plan_resume(run_dir, layers)      # only for --resume
    run = prepare(config, resume=checkpoint)               # data, backbone + features, model + optimizer
    summary = pyfast.train.loop.train(run)

`prepare` loads the backbone and its --backbone-weights (the backbone's input size is the default
image size), opens the data sources, probes the backbone, builds the heads, optimizer, scheduler
and scaler, restores a checkpoint when resuming, and checks that the output folders are writable,
all before creating anything on disk: a start that fails (a weights file that does not fit
included) leaves no run directory, and a refused `--resume` leaves the run's config.yaml as it was.

With several ranks (`pyfast.train.distributed`) every rank builds and checks the same run; the ranks
agree that all of them succeeded before rank 0 creates the run directory, and again once it has,
so a start that fails on any rank stops every rank with one message. Rank 0 alone writes.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from pyfast import _native
from pyfast.cache import FeatureCache, module_digest
from pyfast.data import Letterbox, RobustDataset, SkippedSample, SkipTracker, TooManyBadSamples, build_sources, collate
from pyfast.models import DEFAULT_BACKBONE, BackboneError, FeatureMap, Refiner, load_backbone, probe
from pyfast.models.weights import WeightsError
from pyfast.train.checkpoint import CheckpointError, load_checkpoint, load_state_dict_checked, save_checkpoint
from pyfast.train.config import (DEFAULT_IMAGE_SIZE, FAST, FIELDS, ConfigError, TrainConfig, build_config, flag_name,
                                 save_config)
from pyfast.train.distributed import World, agreed, wrap_model
from pyfast.train.features import STORE_DTYPES, CachedFeatures, FeatureProvider, feature_fingerprint
from pyfast.train.guards import NonFiniteGuard
from pyfast.train.memory import RunMemory, parse_rule
from pyfast.train.metrics import read_jsonl, truncate_after
from pyfast.train.objective import LossWeights
from pyfast.train.rundir import RunDir, RunDirError, check_files_writable, check_writable, default_run_dir
from pyfast.train.sharding import epoch_order, micro_slots, rank_batches, rank_share, slot_weight
from pyfast.train.state import Progress, RngState, RunStats

SPLIT_SEED = 20261123  # the train/val split does not move with --seed: runs compare on one val set
CHECKPOINT_FORMAT = "pyfast.train/2"
# Settings a resumed run may change without breaking its exact continuation.
RESUME_SAFE = ("max_steps", "workers", "checkpoint_every", "max_nonfinite_in_a_row", "max_skip_fraction",
               "memory_every", "max_memory_growth", "memory_rule", "cache_dir", "out", "device", "fast",
               "dist_timeout")
# Allowed, but it changes the schedule from the resume point on (the log says how).
RESUME_RESCHEDULES = ("epochs",)
OPTIONAL_ENTRIES = ("memory",)  # checkpoints of this format written before these entries existed lack them


# ---------------------------------------------------------------------------------------- devices


def resolve_device(name: str, world: Optional[World] = None) -> torch.device:
    """The device of --device `name` for this process. Under torchrun each rank uses the GPU of its
    LOCAL_RANK: `auto` and `cuda` mean that one, and naming another GPU is refused."""
    world = world or World()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)  # its form was checked with the config
    if device.type == "cuda" and world.size > 1:
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index != world.local_rank:
            raise ConfigError(f"--device {name}: under torchrun each process uses the GPU of its LOCAL_RANK "
                              f"(cuda:{world.local_rank} here); pass --device cuda or auto")
        if world.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {world.local_rank} but this machine has {torch.cuda.device_count()} CUDA "
                              "device(s): start at most one process per GPU (--nproc-per-node)")
        device = torch.device("cuda", world.local_rank)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 on CUDA GPUs that support it, fp16 (with a GradScaler) on older ones, fp32 on CPU."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def describe_backend(device: torch.device) -> str:
    """Which implementation of the pyfast ops runs on `device`: native kernels or the reference twins."""
    if _native.backend_setting() == "reference":
        return "reference (PYFAST_BACKEND=reference)"
    if _native.native_available(device.type):
        return f"native {device.type}"
    return f"reference (no native {device.type} kernels in this build)"


def autocast_for(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A zero-argument callable returning the autocast context of `precision` (none for fp32)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def lr_lambda(warmup: int, total: int, floor: float = 0.05) -> Callable[[int], float]:
    """Linear warm-up over `warmup` steps, then a cosine decay to `floor` at step `total`."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------- data


@dataclass
class TrainData:
    """The data set of a run, split once into training and validation indices (global indices of
    `dataset`), this rank's share of them, and the DataLoaders over them.

    The order of an epoch is a pure function of (seed, epoch), and this rank's batches of it of
    (seed, epoch, rank, world size) (`pyfast.train.sharding`): a checkpoint records the global
    position (epoch, micro-batch slot) and a resumed run continues exactly there.
    """

    dataset: RobustDataset
    train_indices: list
    val_indices: list
    batch_size: int
    workers: int
    pin_memory: bool
    seed: int
    rank: int = 0
    world_size: int = 1

    @property
    def micro_per_epoch(self) -> int:
        # every training sample is met once an epoch across the ranks (the last slot may be short),
        # so the first epoch fills the feature cache completely
        return micro_slots(len(self.train_indices), self.batch_size, self.world_size)

    def steps_per_epoch(self, accumulate: int) -> int:
        return math.ceil(self.micro_per_epoch / accumulate)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batch of each micro-batch slot of `epoch` (possibly empty in the last slot)."""
        order = epoch_order(self.train_indices, self.seed, epoch)
        return rank_batches(order, self.batch_size, self.rank, self.world_size)

    def weight(self, slot: int) -> float:
        """The factor on this rank's loss in micro-batch slot `slot` (1.0 unless the slot is short)."""
        if self.world_size == 1:
            return 1.0
        return slot_weight(len(self.train_indices), slot, self.batch_size, self.rank, self.world_size)

    def val_batches(self) -> list[list[int]]:
        """This rank's share of the validation set, in batches."""
        idx, bs = rank_share(self.val_indices, self.rank, self.world_size), self.batch_size
        return [idx[i : i + bs] for i in range(0, len(idx), bs)]

    def loader(self, batches: list[list[int]]) -> DataLoader:
        return DataLoader(self.dataset, batch_sampler=batches, collate_fn=collate, num_workers=self.workers,
                          pin_memory=self.pin_memory)

    def identity(self) -> dict:
        """What a checkpoint's data position refers to: a resumed run must see the same set."""
        return {"samples": len(self.dataset), "train": len(self.train_indices), "val": len(self.val_indices)}


class DataError(ValueError):
    """The data sources could not be opened; the message is the data layer's, `__cause__` its exception."""


def build_data(cfg: TrainConfig, device: torch.device, log: Callable[[str], None], world: Optional[World] = None) -> TrainData:
    """Open the sources, letterbox, split. Whatever the data layer raises while opening them
    becomes a DataError carrying its message on one line (its class named when it is neither an
    OSError nor a ValueError, whose messages are written for users)."""
    try:
        sources = build_sources(cfg.data_specs(), log=log)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as error:
        message = " ".join(str(error).split()) or type(error).__name__
        if not isinstance(error, (OSError, ValueError)):
            message = f"{type(error).__name__}: {message}"
        raise DataError(message) from error
    dataset = RobustDataset(sources, preprocess=Letterbox(cfg.image_size))
    n = len(dataset)
    if n == 0:
        raise ConfigError("no samples to train on: every data source is empty or missing")
    n_val = max(1, int(round(n * cfg.val_fraction)))
    if n - n_val < 1:
        raise ConfigError(f"{n} samples leave none for training after the validation split (--val-fraction {cfg.val_fraction:g})")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    workers = cfg.workers if cfg.workers is not None else (2 if device.type == "cuda" else 0)
    world = world or World()
    return TrainData(dataset, sorted(order[n_val:]), sorted(order[:n_val]), cfg.batch_size, workers,
                     device.type == "cuda", cfg.seed, world.rank, world.size)


# ----------------------------------------------------------------------------- backbone, features


# pyfast.load_weights' hints in an error message -> the flags that do the same here
WEIGHTS_FLAGS = {
    "prefixes=...": "--backbone-weights-prefix P",
    "state_key=...": "--backbone-weights-key KEY",
    "pyfast-doctor checkpoint --unsafe-pickle": "--backbone-weights-unsafe-pickle",
}


def load_run_backbone(cfg: TrainConfig, log: Callable[[str], None]) -> nn.Module:
    """The frozen backbone of --backbone with --backbone-weights loaded into it (on the CPU), and
    `cfg.image_size` settled from the backbone's input size. A file that cannot be read or does not
    fit raises WeightsError naming it; nothing is written."""
    spec = cfg.backbone or DEFAULT_BACKBONE
    options = {}
    if cfg.backbone_weights is not None:
        options = {"prefixes": tuple(cfg.backbone_weights_prefix), "state_key": cfg.backbone_weights_key,
                   "weights_only": not cfg.backbone_weights_unsafe_pickle}
    elif cfg.backbone_weights_prefix or cfg.backbone_weights_key or cfg.backbone_weights_unsafe_pickle:
        raise ConfigError("--backbone-weights-prefix, --backbone-weights-key and --backbone-weights-unsafe-pickle "
                          "apply to --backbone-weights, which is not set")
    try:
        backbone = load_backbone(spec, weights=cfg.backbone_weights, log=log, **options)
    except WeightsError as error:  # the library's hints, in the words of this command line
        message = str(error)
        for library, flag in WEIGHTS_FLAGS.items():
            message = message.replace(library, flag)
        raise WeightsError(message, error.report) from None
    cfg.image_size = settle_image_size(cfg, backbone, spec, log)
    return backbone


def settle_image_size(cfg: TrainConfig, backbone: nn.Module, spec: str, log: Callable[[str], None]) -> int:
    """--image-size, or the backbone's `input_size` when it is not given (else DEFAULT_IMAGE_SIZE).

    A backbone that declares an input size takes another only where its `check_input_size(size)`
    allows it (ViT/DINO: a multiple of the patch size, positions interpolated; SAM: never); a
    backbone without that method takes only its own.
    """
    declared = getattr(backbone, "input_size", None)
    if cfg.image_size is None:
        return int(declared) if declared is not None else DEFAULT_IMAGE_SIZE
    if declared is None or int(declared) == cfg.image_size:
        return cfg.image_size
    declared = int(declared)
    by_fast = cfg.fast and cfg.image_size == FAST["image_size"]
    given = f"--image-size {cfg.image_size}" + (" (set by --fast)" if by_fast else "")
    fix = f"pass --image-size {declared}" if by_fast else f"leave --image-size out to use its {declared}"
    check = getattr(backbone, "check_input_size", None)
    try:
        if check is None:
            raise BackboneError(f"it takes only {declared}x{declared} images (its input_size)")
        note = check(cfg.image_size)
    except BackboneError as error:
        raise BackboneError(f"{given}: backbone {spec}: {error}; {fix}") from None
    log(f"{given} for backbone {spec}, made for {declared}x{declared}" + (f": {note}" if note else ""))
    return cfg.image_size


def build_backbone(cfg: TrainConfig, backbone: nn.Module, device: torch.device):
    """Every map `backbone` returns at the run's image size (probed on `device`) and the maps the heads use."""
    spec = cfg.backbone or DEFAULT_BACKBONE
    try:
        layout = probe(backbone, cfg.image_size, device)
    except BackboneError as error:  # named once: an hf: encoder's own messages start with its name
        named = str(error).startswith(str(getattr(backbone, "name", spec)))
        raise BackboneError(str(error) if named else f"--backbone {spec}: {error}") from None
    except Exception as error:  # the extractor's own failure on a blank image: one line, naming it
        text = (str(error).strip().splitlines() or [""])[0]
        raise BackboneError(f"--backbone {spec} fails on a {cfg.image_size}x{cfg.image_size} image: "
                            f"{type(error).__name__}: {text}") from None
    if cfg.feature_maps:
        unknown = [name for name in cfg.feature_maps if name not in layout]
        if unknown:
            raise ConfigError(f"--feature-maps: the backbone has no map {', '.join(map(repr, unknown))} "
                              f"(its maps: {', '.join(repr(n) for n in layout)})")
        use = list(cfg.feature_maps)
    else:
        use = [list(layout)[-1]]
    return layout, use


def describe_backbone(cfg: TrainConfig, backbone: nn.Module, layout: dict[str, FeatureMap], use: list[str]) -> dict:
    """What summary.json and the checkpoints record of the backbone: what it is, the maps, the
    weights and their load report, and the digest of its state (what a resumed run must find again)."""
    report = getattr(backbone, "weights_report", None)
    inner = getattr(backbone, "model", None)  # an hf: encoder's transformers model
    return {
        "spec": cfg.backbone or DEFAULT_BACKBONE,
        "class": type(inner if isinstance(inner, nn.Module) else backbone).__name__,
        "input_size": getattr(backbone, "input_size", None),
        "image_size": cfg.image_size,
        "maps": {name: {"channels": m.channels, "stride": m.stride, "size": m.size} for name, m in layout.items()},
        "feature_maps": list(use),
        "weights": cfg.backbone_weights,
        "weights_report": report.to_dict() if report is not None else None,
        "digest": module_digest(backbone),
    }


def backbone_lines(info: dict, report) -> list[str]:
    """The start-up lines: the backbone and its maps, and how its weights loaded."""
    maps = ", ".join(f"{name} ({m['channels']} ch, stride {m['stride']})" for name, m in info["maps"].items())
    kind = "" if info["spec"].endswith(info["class"]) else f" ({info['class']})"
    lines = [f"backbone: {info['spec']}{kind} at {info['image_size']}x{info['image_size']}; maps {maps}; "
             f"heads read {', '.join(info['feature_maps'])}"]
    if report is not None:
        lines.append(f"backbone weights: {report.source} ({report.format}): {report.describe()}")
    return lines


# ----------------------------------------------------------------------------- model, optimizer


def build_model(cfg: TrainConfig, layout: dict[str, FeatureMap], use: list[str], device: torch.device) -> Refiner:
    torch.manual_seed(cfg.seed)
    return Refiner(
        [layout[n].channels for n in use], [layout[n].stride for n in use], roi_size=cfg.roi_size,
        context=cfg.context, hidden=cfg.hidden, iou_head=cfg.iou_head,
    ).to(device)


def build_optimizer(cfg: TrainConfig, model: Refiner, total_steps: int, device: torch.device, precision: str):
    """AdamW (no decay on biases and norms), warm-up + cosine LambdaLR, GradScaler (on for fp16 only)."""
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, max(total_steps, 1)))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    return optimizer, scheduler, scaler


class _CheckedModel:
    """The model as a checkpoint entry: loads through `load_state_dict_checked`, refusing any mismatch."""

    def __init__(self, model, log):
        self.model, self.log = model, log

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state):
        load_state_dict_checked(self.model, state, min_fraction=1.0, log=self.log)


# -------------------------------------------------------------------------------------------- run


@dataclass
class Run:
    """Everything a training run is made of; `pyfast.train.loop.train(run)` trains it."""

    cfg: TrainConfig
    paths: RunDir
    device: torch.device
    precision: str
    backend: str
    world: World
    data: TrainData
    features: FeatureProvider
    model: Refiner
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    autocast: Callable[[], contextlib.AbstractContextManager]  # the precision's autocast context, per use
    weights: LossWeights
    guard: NonFiniteGuard
    skips: SkipTracker
    progress: Progress
    stats: RunStats
    rng: RngState
    memory: RunMemory
    log: Callable[[str], None]
    backbone_info: dict = field(default_factory=dict)  # describe_backbone's: summary.json and checkpoints

    @property
    def ddp(self) -> Optional[torch.nn.Module]:
        """DistributedDataParallel over the heads, with several ranks; the world owns it and releases it
        when it closes (None then, and with one rank)."""
        return self.world.ddp

    @property
    def world_size(self) -> int:
        return self.world.size

    @property
    def steps_per_epoch(self) -> int:
        return self.data.steps_per_epoch(self.cfg.accumulate)

    def stateful(self) -> dict:
        """Every object whose state a checkpoint holds, by checkpoint key: the one list that both
        saving and restoring read."""
        return {
            "model": _CheckedModel(self.model, self.log),
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "scaler": self.scaler,
            "guard": self.guard,
            "progress": self.progress,
            "stats": self.stats,
            "rng": self.rng,
            "memory": self.memory,
        }

    def checkpoint(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.as_dict(),
            "data": self.data.identity(),
            "world_size": self.world.size,
            "device": str(self.device),
            "backbone": self.backbone_info,
            **{name: obj.state_dict() for name, obj in self.stateful().items()},
        }

    def restore(self, payload: dict) -> None:
        for name, obj in self.stateful().items():
            if name in OPTIONAL_ENTRIES and name not in payload:
                self.log(f"note: the checkpoint has no {name!r} entry (written before it existed): it starts afresh")
                continue
            obj.load_state_dict(payload[name])

    def save(self, name: str = "last") -> Optional[Path]:
        """Write checkpoints/NAME.pt (rank 0 alone: the ranks hold the same state)."""
        if not self.world.is_main:
            return None
        path = self.paths.checkpoints / f"{name}.pt"
        save_checkpoint(path, self.checkpoint())
        return path


# ------------------------------------------------------------------------------------------ resume


def _check_world_size(run_dir, checkpoint: dict, size: int) -> None:
    before = int(checkpoint.get("world_size", 1))
    if before != size:
        raise CheckpointError(
            f"--resume {run_dir}: the run was trained with world size {before} and this start has world size "
            f"{size}; the batches of a step, the steps of an epoch and the learning-rate schedule depend on "
            f"it, so resume with {before} process{'es' if before > 1 else ''} in all (torchrun --nnodes x "
            f"--nproc-per-node), or start a new run with another --out"
        )


def plan_resume(run_dir, layers: list[dict], log: Callable[[str], None] = print,
                world_size: Optional[int] = None) -> tuple[TrainConfig, dict]:
    """The configuration and the checkpoint of a run to continue.

    The checkpoint's own config is the base (config.yaml is for reading); `layers` (--fast,
    --config, flags) may only change what keeps the continuation exact (RESUME_SAFE) or `epochs`
    (the log says how the schedule changes); anything else raises ConfigError naming the settings.
    `world_size`: the world of this start, refused early when it differs from the checkpoint's
    (`prepare` checks it in any case). Nothing is written.
    """
    paths = RunDir(Path(run_dir))
    if not paths.last.exists():
        missing = "config.yaml and checkpoints/last.pt are" if not paths.config.exists() else "checkpoints/last.pt is"
        raise RunDirError(f"--resume {run_dir}: no run to resume there ({missing} missing)")
    checkpoint = load_checkpoint(paths.last)
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {paths.last} has format {checkpoint.get('format')!r}, this pyfast resumes "
                              f"{CHECKPOINT_FORMAT!r}; start a new run")
    if world_size is not None:
        _check_world_size(run_dir, checkpoint, world_size)
    saved = checkpoint["config"]
    try:
        merged = build_config(saved, *layers, {"out": str(run_dir)})
    except ConfigError as error:
        raise CheckpointError(f"checkpoint {paths.last}: {error}") from None
    changed = {name: (saved.get(name), getattr(merged, name)) for name in FIELDS if saved.get(name) != getattr(merged, name)}
    refused = [name for name in changed if name not in RESUME_SAFE + RESUME_RESCHEDULES]
    if refused:
        listed = "; ".join(f"{flag_name(n)} {changed[n][0]!r} -> {changed[n][1]!r}" for n in refused)
        allowed = ", ".join(flag_name(n) for n in RESUME_SAFE + RESUME_RESCHEDULES if n not in ("out", "fast"))
        raise ConfigError(
            f"--resume {run_dir}: changing {listed} would not continue the run exactly; on resume only "
            f"{allowed} may change (start a new run with another --out to use other settings)"
        )
    if "epochs" in changed:
        old, new = changed["epochs"]
        log(f"--epochs {old} -> {new}: the learning-rate schedule now spans {new} epochs from step "
            f"{checkpoint['progress']['step']} on (steps taken keep their rates), so the result differs "
            f"from a run started with --epochs {new}")
    return merged, checkpoint


def check_backbone_identity(checkpoint: dict, info: dict, paths: RunDir) -> None:
    """A resumed run must find the backbone it was trained on: the heads fit its features."""
    before = checkpoint.get("backbone") or {}
    if before.get("digest") not in (None, info["digest"]):
        weights = f" (--backbone-weights {info['weights']}: was the file replaced?)" if info["weights"] else ""
        raise CheckpointError(
            f"--resume {paths.path}: the backbone {info['spec']} is not the one the run was trained on: its weights "
            f"or preprocessing differ{weights}; the heads fit the old features, so start a new run with another --out"
        )


# ----------------------------------------------------------------------------------------- prepare


def prepare(
    config: TrainConfig,
    *,
    resume: Optional[dict] = None,
    log: Callable[[str], None] = print,
    world: Optional[World] = None,
) -> Run:
    """Build a run from `config` (and the checkpoint to continue, from `plan_resume`). Every check
    happens before the run directory or the cache is created or written.

    world: the ranks of the run (default: what torchrun's environment says, started here; a plain
    process is rank 0 of 1). Every rank builds the same run; a failure on any rank raises on every
    rank (the others raise RankFailed naming it), before anything is written when it happens during
    the checks. `log` prints on rank 0 only.
    """
    world = (world if world is not None else World.from_env()).start()  # a no-op once started
    try:
        return _prepare(config, resume, log, world)
    except BaseException as error:
        if world.size > 1 and not world.broken and not agreed(error):
            world.agree(error)  # meet the other ranks at the agreement they are waiting at; raises
        raise


def _quiet(*args, **kwargs) -> None:
    pass


def _prepare(config: TrainConfig, resume: Optional[dict], log: Callable[[str], None], world: World) -> Run:
    # Collectives first, while every rank is bound to reach them: the config is the same everywhere.
    cfg = config.validate()
    world.set_timeout(cfg.dist_timeout)
    paths = RunDir(Path(cfg.out) if cfg.out else world.broadcast(default_run_dir() if world.is_main else None))
    if not world.is_main:
        log = _quiet
    if resume is not None:
        _check_world_size(paths.path, resume, world.size)
    if world.is_main:  # the run directory is rank 0's alone (on other machines it may not even exist)
        if resume is None and paths.holds_run():
            raise RunDirError(
                f"--out {paths.path} already holds a run; continue it with `pyfast-train --resume {paths.path}` "
                "or pick another --out (delete the folder to start over there)"
            )
        check_writable(paths.path, "--out" if resume is None else "--resume")
        if resume is not None:
            check_files_writable([paths.config, paths.metrics, paths.val, paths.skipped, paths.last], "--resume")
    cache_root = None
    if cfg.cache_dir is None or cfg.cache_dir.lower() != "off":
        cache_root = Path(cfg.cache_dir) if cfg.cache_dir else paths.cache
        check_writable(cache_root, "--cache-dir")  # every rank writes its share of the cache

    device = resolve_device(cfg.device, world)
    precision = resolve_precision(cfg.precision, device)
    if precision == "fp16" and device.type == "cpu":
        log("warning: fp16 on CPU is slow and needs a GradScaler; bf16 is the CPU choice")
    backend = describe_backend(device)
    if backend.startswith("reference") and _native.backend_setting() != "reference":
        log(f"warning: pyfast has no native {device.type} kernels in this build: the ops run their PyTorch reference twins")
    seed_everything(cfg.seed)

    backbone = load_run_backbone(cfg, log)  # first: its input size is the data's image size
    data = build_data(cfg, device, log, world)
    layout, use = build_backbone(cfg, backbone.to(device), device)
    backbone_info = describe_backbone(cfg, backbone, layout, use)
    for line in backbone_lines(backbone_info, getattr(backbone, "weights_report", None)):
        log(line)
    if resume is not None:
        check_backbone_identity(resume, backbone_info, paths)
    model = build_model(cfg, layout, use, device)
    optimizer, scheduler, scaler = build_optimizer(cfg, model, data.steps_per_epoch(cfg.accumulate) * cfg.epochs,
                                                   device, precision)
    store_dtype = STORE_DTYPES[cfg.cache_dtype]
    fingerprint = feature_fingerprint(backbone, data.dataset.preprocess.fingerprint(), cfg.image_size, precision, store_dtype)
    autocast = autocast_for(device, precision)
    run = Run(
        cfg=cfg, paths=paths, device=device, precision=precision, backend=backend, world=world, data=data,
        # the cache is attached once it exists, after every check
        features=FeatureProvider(backbone, layout, use, None, device, autocast, store_dtype),
        model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, autocast=autocast,
        weights=LossWeights(cfg.box_weight, cfg.mask_weight, cfg.iou_weight, cfg.box_loss),
        guard=NonFiniteGuard(cfg.max_nonfinite_in_a_row),
        # Every rank counts skipped samples (the records of all ranks are merged at each step); rank 0 logs them.
        skips=SkipTracker(len(data.dataset), max_fraction=cfg.max_skip_fraction,
                          log_path=paths.skipped if world.is_main else None, resume=resume is not None),
        progress=Progress(), stats=RunStats(), rng=RngState(),
        memory=RunMemory(cfg.memory_every, parse_rule(cfg.memory_rule), cfg.max_memory_growth, log), log=log,
        backbone_info=backbone_info,
    )

    if resume is not None:
        if resume["data"] != data.identity():
            raise ConfigError(f"--resume {paths.path}: the data set changed since the checkpoint "
                              f"({resume['data']} then, {data.identity()} now); resuming would not continue the run")
        run.restore(resume)
        if resume["device"] != str(device):
            log(f"note: the run continues on {device} after {resume['device']}: its numbers will not be bit-identical "
                "to an uninterrupted run")

    # ---- everything checked, on every rank: rank 0 creates and writes, then the others open the cache
    world.agree()
    created = world.is_main and not paths.path.exists()
    try:
        cache = world.attempt(_create_run_dir, cfg, paths, cache_root, fingerprint, store_dtype, resume is not None,
                              run.progress.step) if world.is_main else None
        world.agree()
        if not world.is_main and cache_root is not None:
            # the same folder: one cache for all ranks
            cache = world.attempt(lambda: FeatureCache(cache_root, fingerprint, dtype=store_dtype))
        world.agree()
        if world.is_main:  # memory.jsonl / memory.json (on a resume: back to the checkpoint's samples)
            world.attempt(run.memory.attach, paths.path)
        world.agree()
    except BaseException:  # this rank or another failed, or Ctrl-C: a start that fails leaves nothing behind
        if created:
            shutil.rmtree(paths.path, ignore_errors=True)
        raise
    run.features.cache = cache
    if cache is not None:
        data.dataset.features = CachedFeatures(cache, layout, use)
    wrap_model(model, world, device)  # run.ddp: the world keeps it until it closes
    if resume is not None and world.size > 1:
        share_skipped(run.skips, paths.skipped, world)
    if resume is not None:
        p = run.progress
        log(f"resumed {paths.path} at step {p.step} (epoch {p.epoch + 1}, batch {p.micro})")
    return run


def _create_run_dir(cfg: TrainConfig, paths: RunDir, cache_root: Optional[Path], fingerprint: str, store_dtype,
                    resuming: bool, step: int) -> Optional[FeatureCache]:
    """Rank 0's writes once every check passed: the run directory, config.yaml, the feature cache (its
    folder), and, on a resume, metrics and validation records cut back to the checkpoint's step."""
    try:
        paths.path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, paths.config)
        cache = FeatureCache(cache_root, fingerprint, dtype=store_dtype) if cache_root is not None else None
        if resuming:
            truncate_after(paths.metrics, step)
            truncate_after(paths.val, step)
    except OSError as error:  # the checks passed, yet the file system said no
        raise RunDirError(f"cannot write the run directory {paths.path}: {error.strerror or error}") from None
    return cache


def share_skipped(skips: SkipTracker, path: Path, world: World) -> None:
    """Rank 0's skipped-sample records of a resumed run (read from skipped.jsonl) counted on every rank too."""
    records = None
    if world.is_main:
        records = [SkippedSample(source=r["source"], file=r["file"], reason=r["reason"], index=int(r["index"]),
                                 category=r.get("category", "")) for r in read_jsonl(path)]
    records = world.broadcast(records)
    if not world.is_main:
        try:
            skips.record(records)
        except TooManyBadSamples:  # rank 0 does not raise on reading them either: all ranks raise at the next record
            pass
