"""The training loop.

    trainer = Trainer(config)          # builds data, backbone, cache, model, optimizer, run dir
    summary = trainer.run()            # trains, validates, checkpoints; returns summary.json's dict

One optimizer step = `accumulate` micro-batches. Per step the loop makes one host sync: the loss,
its parts, the gradient norm and the batch IoUs are stacked and read back together; that read
decides whether the step is applied (finite loss and gradient) or skipped and counted (no
parameter, optimizer, scheduler or scaler-step change; the fp16 scaler lowers its scale).

Fault injection (for tests and debugging): `Trainer(config, loss_hook=fn)` calls
`fn(step, loss) -> loss` on each micro-batch's loss before backward, `step` being the 1-based
optimizer step being computed; return a NaN to plant a non-finite loss.

Data order is a pure function of (seed, epoch): each epoch's permutation comes from its own
generator and input-box jitter from (seed, epoch, sample key), so a checkpoint records its data
position as (epoch, micro-batch) and `--resume` continues exactly where the run stopped.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

import pyfast
from pyfast.cache import FeatureCache
from pyfast.data import (
    Letterbox,
    RobustDataset,
    SkipTracker,
    build_sources,
    coco_box_ap,
    collate,
    parse_data_spec,
)
from pyfast.models import Refiner, load_backbone, probe
from pyfast.models.refiner import LossWeights, flatten_boxes, mask_targets, refiner_loss
from pyfast.train.checkpoint import load_checkpoint, load_state_dict_checked, save_checkpoint
from pyfast.train.config import TrainConfig, save_config
from pyfast.train.features import FeatureProvider, feature_fingerprint
from pyfast.train.guards import NonFiniteGuard
from pyfast.train.jitter import VAL_EPOCH, jitter_boxes
from pyfast.train.metrics import MetricsLog, truncate_after
from pyfast.train.plots import write_plots
from pyfast.train.signals import GracefulStop
from pyfast.train.summary import write_summary

SPLIT_SEED = 20261123  # the train/val split does not move with --seed: runs compare on one val set
TIMERS = ("data", "features", "forward_loss", "backward", "optimizer")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 on CUDA GPUs that support it, fp16 (with a GradScaler) on older ones, fp32 on CPU."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def lr_lambda(warmup: int, total: int, floor: float = 0.05) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def default_run_dir() -> str:
    return os.path.join("runs", "train-" + datetime.now().strftime("%Y%m%d-%H%M%S"))


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        *,
        resume: bool = False,
        loss_hook: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
        log: Callable[[str], None] = print,
        progress: Optional[bool] = None,
    ):
        self.cfg = cfg = config.validate()
        self.log = log
        self.loss_hook = loss_hook
        self.progress = progress
        self.run_dir = Path(cfg.out or default_run_dir())
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        if self.precision == "fp16" and self.device.type == "cpu":
            self.log("warning: fp16 on CPU is slow and needs a GradScaler; bf16 is the CPU choice")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

        last = self.run_dir / "checkpoints" / "last.pt"
        if resume and not last.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {last}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.run_dir / "config.yaml")

        self._seed_everything(cfg.seed)

        # ---- data ----
        specs = [parse_data_spec(text) for text in cfg.data] or [
            parse_data_spec(
                f"synthetic:,num_samples={cfg.synthetic_samples},image_size={cfg.image_size},seed={cfg.data_seed}"
            )
        ]
        sources = build_sources(specs, log=log)
        self.letterbox = Letterbox(cfg.image_size)
        dataset = RobustDataset(sources, preprocess=self.letterbox)
        n = len(dataset)
        n_val = max(1, int(round(n * cfg.val_fraction)))
        if n - n_val < 1:
            raise ValueError(f"{n} samples leave none for training after the validation split")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
        self.val_set = Subset(dataset, sorted(order[:n_val]))
        self.train_set = Subset(dataset, sorted(order[n_val:]))
        # every training sample is met once an epoch (the last batch may be smaller), so the first
        # epoch fills the feature cache completely
        self.micro_per_epoch = math.ceil(len(self.train_set) / cfg.batch_size)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / cfg.accumulate)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.skips = SkipTracker(
            n, max_fraction=cfg.max_skip_fraction, log_path=self.run_dir / "skipped.jsonl", resume=resume
        )
        self.workers = cfg.workers if cfg.workers is not None else (2 if self.device.type == "cuda" else 0)

        # ---- backbone, cache, model ----
        backbone = load_backbone(cfg.backbone).to(self.device)
        channels, stride = probe(backbone, cfg.image_size, self.device)
        self.stride = stride
        cache = None
        if cfg.cache_dir is None or str(cfg.cache_dir).lower() != "off":
            root = cfg.cache_dir or (self.run_dir / "cache")
            fingerprint = feature_fingerprint(backbone, self.letterbox.fingerprint(), cfg.image_size, self.precision)
            cache = FeatureCache(root, fingerprint)
        self.cache = cache
        self.features = FeatureProvider(backbone, cache, self.device, self._autocast)

        torch.manual_seed(cfg.seed)
        self.model = Refiner(
            channels, stride, roi_size=cfg.roi_size, context=cfg.context, hidden=cfg.hidden,
            iou_head=cfg.iou_head,
        ).to(self.device)
        self.weights = LossWeights(cfg.box_weight, cfg.mask_weight, cfg.iou_weight, cfg.box_loss)
        decay = [p for name, p in self.model.named_parameters() if p.dim() > 1]
        no_decay = [p for name, p in self.model.named_parameters() if p.dim() <= 1]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.warmup_steps, max(self.total_steps, 1))
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.guard = NonFiniteGuard(cfg.max_nonfinite_in_a_row)

        # ---- progress state (all of it goes into checkpoints) ----
        self.step = 0
        self.epoch = 0
        self.micro = 0  # next micro-batch within the epoch
        self.best = -1.0
        self.last_val: dict = {}
        self.timing = {"cold": [0.0, 0], "warm": [0.0, 0]}  # seconds, micro-batches
        self.warm_timers = dict.fromkeys(TIMERS, 0.0)
        self.warm_cache = [0, 0]  # hits, lookups in epochs after the first
        self.scaler_skips = 0
        self.elapsed = 0.0

        if resume:
            self._restore(load_checkpoint(last, map_location=self.device))
            truncate_after(self.run_dir / "metrics.jsonl", self.step)
            truncate_after(self.run_dir / "val.jsonl", self.step)
            self.log(f"resumed {self.run_dir} at step {self.step} (epoch {self.epoch + 1}, batch {self.micro})")

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _loader(self, subset: Subset, batches: list[list[int]]) -> DataLoader:
        return DataLoader(
            subset,
            batch_sampler=batches,
            collate_fn=collate,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
        )

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        perm = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(self.cfg.seed * 100003 + epoch))
        bs = self.cfg.batch_size
        return [perm[i * bs : (i + 1) * bs].tolist() for i in range(self.micro_per_epoch)]

    def _inputs(self, batch, epoch: int):
        cfg = self.cfg
        prompts = [
            jitter_boxes(b, key, seed=cfg.seed, epoch=epoch, shift=cfg.jitter_shift, scale=cfg.jitter_scale,
                         image_size=cfg.image_size)
            for b, key in zip(batch.prompt_boxes, batch.keys)
        ]
        boxes, index = flatten_boxes(prompts, self.device)
        gt, _ = flatten_boxes(batch.boxes, self.device)
        masks = torch.cat(list(batch.masks)).to(self.device, non_blocking=True) if len(batch) else None
        return boxes, index, gt, masks

    def _cache_counts(self) -> tuple[int, int]:
        if self.cache is None:
            return 0, 0
        s = self.cache.stats
        return s.hits, s.hits + s.misses

    # ------------------------------------------------------------------ checkpoints

    def _state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
            "position": {"step": self.step, "epoch": self.epoch, "micro": self.micro},
            "guard": self.guard.state_dict(),
            "best_metric": self.best,
            "last_val": self.last_val,
            "timing": self.timing,
            "warm_timers": self.warm_timers,
            "warm_cache": self.warm_cache,
            "scaler_skips": self.scaler_skips,
            "elapsed": self.elapsed,
            "config": self.cfg.as_dict(),
        }

    def save(self, name: str = "last") -> Path:
        path = self.run_dir / "checkpoints" / f"{name}.pt"
        save_checkpoint(path, self._state())
        return path

    def _restore(self, state: dict) -> None:
        load_state_dict_checked(self.model, state["model"], min_fraction=1.0, log=self.log)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"].cpu())
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        pos = state["position"]
        self.step, self.epoch, self.micro = int(pos["step"]), int(pos["epoch"]), int(pos["micro"])
        self.guard.load_state_dict(state["guard"])
        self.best = float(state["best_metric"])
        self.last_val = dict(state.get("last_val") or {})
        self.timing = {k: list(v) for k, v in state["timing"].items()}
        self.warm_timers = dict(state["warm_timers"])
        self.warm_cache = list(state["warm_cache"])
        self.scaler_skips = int(state["scaler_skips"])
        self.elapsed = float(state["elapsed"])

    # ------------------------------------------------------------------ validation

    @torch.no_grad()
    def validate(self) -> dict:
        """Mean IoU of input and refined boxes, mask IoU (running sums) and COCO box AP over the validation set.

        AP needs every box of the set at once: it keeps small per-image numpy arrays (never tensors
        with graphs or devices), bounded by the validation set, and scores every box 1 so that AP
        measures localization alone, for the input and the refined boxes alike.
        """
        self.model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        boxes_per_image: dict[str, list[np.ndarray]] = {"gt": [], "input": [], "refined": []}
        bs = self.cfg.batch_size
        idx = list(range(len(self.val_set)))
        loader = self._loader(self.val_set, [idx[i : i + bs] for i in range(0, len(idx), bs)])
        for batch in loader:
            self.skips.record(batch.skipped)
            if not len(batch):
                continue
            feats = self.features(batch)
            boxes, index, gt, masks = self._inputs(batch, VAL_EPOCH)
            if not len(boxes):
                continue
            with self._autocast():
                out = self.model(feats, boxes, index)
            target = mask_targets(masks, out.rois, out.mask_logits.shape[-1])
            sums += torch.stack(
                [
                    pyfast.box_iou(boxes, gt).sum(),
                    pyfast.box_iou(out.refined, gt).sum(),
                    pyfast.mask_iou(out.mask_logits, target).float().sum(),
                    torch.tensor(float(len(boxes)), device=self.device),
                ]
            ).double()
            splits = np.cumsum(torch.bincount(index, minlength=len(batch)).tolist())[:-1]
            for name, value in (("gt", gt), ("input", boxes), ("refined", out.refined)):
                boxes_per_image[name].extend(np.split(value.detach().float().cpu().numpy(), splits))
        self.model.train()
        iou_in, iou_ref, mask_iou, count = sums.tolist()
        count = max(count, 1.0)
        result = {"val_iou_input": iou_in / count, "val_iou_refined": iou_ref / count, "val_mask_iou": mask_iou / count}
        if boxes_per_image["gt"]:
            gt = boxes_per_image["gt"]
            result["val_ap_input"] = coco_box_ap(gt, boxes_per_image["input"])["AP"]
            result["val_ap_refined"] = coco_box_ap(gt, boxes_per_image["refined"])["AP"]
        return result

    def _validate_and_checkpoint(self, metrics: MetricsLog) -> None:
        result = self.validate()
        self.last_val = {"step": self.step, "epoch": self.epoch, **result}
        metrics_val = MetricsLog(self.run_dir / "val.jsonl")
        metrics_val.write(self.last_val)
        metrics_val.close()
        if result["val_iou_refined"] > self.best:
            self.best = result["val_iou_refined"]
            self.save("best")

    # ------------------------------------------------------------------ training

    def _micro_step(self, batch, epoch: int, acc: list, micro_count: int) -> bool:
        """Forward + backward of one micro-batch; adds to the accumulators. False if it had no boxes."""
        t0 = time.perf_counter()
        feats = self.features(batch)
        boxes, index, gt, masks = self._inputs(batch, epoch)
        if not len(boxes):
            return False
        t1 = time.perf_counter()
        with self._autocast():
            out = self.model(feats, boxes, index)
            loss, parts = refiner_loss(out, gt, masks, self.cfg.image_size, self.weights)
        if self.loss_hook is not None:
            loss = self.loss_hook(self.step + 1, loss)
        t2 = time.perf_counter()
        self.scaler.scale(loss / micro_count).backward()
        t3 = time.perf_counter()
        with torch.no_grad():
            values = [loss.detach().float(), *[p.float() for p in parts.values()]]
            values += [pyfast.box_iou(boxes, gt).mean(), pyfast.box_iou(out.refined.detach(), gt).mean()]
            stacked = torch.stack(values)
        acc[0] = stacked if acc[0] is None else acc[0] + stacked
        acc[1] = list(parts)
        acc[2] += 1
        self._timers["features"] += t1 - t0
        self._timers["forward_loss"] += t2 - t1
        self._timers["backward"] += t3 - t2
        return True

    def _optimizer_step(self, acc: list) -> tuple[bool, list[float], float]:
        """Unscale, clip, one host read; apply the step only when loss and gradient are finite."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.clip_norm if self.cfg.clip_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros((), device=self.device)
        host = torch.cat([acc[0] / acc[2], norm.reshape(1).float()]).tolist()  # the one sync of the step
        values, grad_norm = host[:-1], host[-1]
        loss_finite = math.isfinite(values[0])
        finite = loss_finite and math.isfinite(grad_norm)
        if finite:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
        else:
            if self.scaler.is_enabled():
                self.scaler.update()  # lowers the scale; the scheduler does not move
                if loss_finite:
                    self.scaler_skips += 1
        self.optimizer.zero_grad(set_to_none=True)
        return finite, values, grad_norm

    def run(self) -> dict:
        metrics = MetricsLog(self.run_dir / "metrics.jsonl", tensorboard_dir=self.run_dir / "tensorboard")
        status = "completed"
        error: Optional[BaseException] = None
        start = time.perf_counter()
        self.model.train()
        with GracefulStop() as stop:
            try:
                self._train(metrics, stop)
                if stop.requested:
                    status = f"interrupted ({stop.name})"
            except BaseException as exc:  # diverged, too many bad samples, Ctrl-C twice: save what we have
                status = f"failed: {type(exc).__name__}"
                error = exc
            finally:
                self.elapsed += time.perf_counter() - start
                metrics.close()
                try:
                    if status == "completed" or stop.requested or error is not None:
                        self.save("last")
                finally:
                    summary = self.summary(status)
                    write_summary(self.run_dir / "summary.json", summary)
                    write_plots(self.run_dir)
        self.stop_code = stop.exit_code
        if error is not None:
            raise error
        return summary

    def _stop_due(self) -> bool:
        return self.cfg.max_steps is not None and self.step >= self.cfg.max_steps

    def _train(self, metrics: MetricsLog, stop: GracefulStop) -> None:
        cfg = self.cfg
        validated_at = self.last_val.get("step")
        while self.epoch < cfg.epochs and not self._stop_due() and not stop.requested:
            epoch = self.epoch
            phase = "cold" if epoch == 0 else "warm"
            cache_before = self._cache_counts()
            batches = self._epoch_batches(epoch)[self.micro :]
            loader_iter = iter(self._loader(self.train_set, batches))
            bar = _progress(self.steps_per_epoch, self.micro // cfg.accumulate, f"epoch {epoch + 1}/{cfg.epochs}", self.progress)
            while self.micro < self.micro_per_epoch:
                if self._stop_due() or stop.requested:
                    break
                self._timers = dict.fromkeys(TIMERS, 0.0)
                t_start = time.perf_counter()
                acc: list = [None, [], 0]
                micro_count = min(cfg.accumulate, self.micro_per_epoch - self.micro)
                for _ in range(micro_count):
                    t0 = time.perf_counter()
                    batch = next(loader_iter)
                    self.skips.record(batch.skipped)
                    self._timers["data"] += time.perf_counter() - t0
                    if len(batch):
                        self._micro_step(batch, epoch, acc, micro_count)
                t0 = time.perf_counter()
                if acc[2] == 0:  # every sample of the step was skipped: nothing to learn from
                    self.optimizer.zero_grad(set_to_none=True)
                    self.micro += micro_count
                    continue
                finite, values, grad_norm = self._optimizer_step(acc)
                self.step += 1
                self.micro += micro_count  # the data position only moves at step boundaries
                self._timers["optimizer"] += time.perf_counter() - t0
                seconds = time.perf_counter() - t_start
                per_batch = seconds / micro_count
                self.timing[phase][0] += seconds
                self.timing[phase][1] += micro_count
                if phase == "warm":
                    for key, value in self._timers.items():
                        self.warm_timers[key] += value
                hits, lookups = self._cache_counts()
                hit_rate = (hits - cache_before[0]) / max(1, lookups - cache_before[1]) if self.cache else None
                parts = dict(zip(acc[1], values[1 : 1 + len(acc[1])]))
                record = {
                    "step": self.step,
                    "epoch": epoch + 1,
                    "loss": values[0],
                    "parts": parts,
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "grad_norm": grad_norm,
                    "s_per_batch": per_batch,
                    "cache_hit_rate": hit_rate,
                    "iou_input": values[-2],
                    "iou_refined": values[-1],
                    "skipped_step": not finite,
                }
                metrics.write(record)
                bar.update(1)
                bar.set_postfix({"s/batch": f"{per_batch:.3f}", "loss": f"{values[0]:.4f}",
                                 "hit": "-" if hit_rate is None else f"{hit_rate:.2f}"}, refresh=False)
                if not finite:
                    self.log(f"step {self.step}: non-finite loss or gradient, step skipped")
                    self.guard.update(False, self.step)
                else:
                    self.guard.update(True, self.step)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save("last")
            bar.close()
            if phase == "warm":
                hits, lookups = self._cache_counts()
                self.warm_cache[0] += hits - cache_before[0]
                self.warm_cache[1] += lookups - cache_before[1]
            if self.micro >= self.micro_per_epoch:
                before = self._cache_counts()
                self._validate_and_checkpoint(metrics)
                validated_at = self.step
                if phase == "warm":
                    hits, lookups = self._cache_counts()
                    self.warm_cache[0] += hits - before[0]
                    self.warm_cache[1] += lookups - before[1]
                self.epoch += 1
                self.micro = 0
                self.save("last")
        if validated_at != self.step and not stop.requested:
            self._validate_and_checkpoint(metrics)

    # ------------------------------------------------------------------ summary

    def summary(self, status: str) -> dict:
        def mean(pair):
            return pair[0] / pair[1] if pair[1] else None

        warm_total = sum(self.warm_timers.values())
        return {
            "status": status,
            "steps": self.step,
            "epochs": self.epoch + self.micro / self.micro_per_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "device": str(self.device),
            "precision": self.precision,
            "s_per_batch_cold": mean(self.timing["cold"]),
            "s_per_batch_warm": mean(self.timing["warm"]),
            "cache_hit_rate": (self.warm_cache[0] / self.warm_cache[1]) if self.warm_cache[1] else None,
            "val_iou_input": self.last_val.get("val_iou_input"),
            "val_iou_refined": self.last_val.get("val_iou_refined"),
            "val_mask_iou": self.last_val.get("val_mask_iou"),
            "val_ap_input": self.last_val.get("val_ap_input"),
            "val_ap_refined": self.last_val.get("val_ap_refined"),
            "best_val_iou_refined": self.best if self.best >= 0 else None,
            "nonfinite_steps": self.guard.total,
            "scaler_skipped_steps": self.scaler_skips,
            "skipped_samples": self.skips.count,
            "warm_step_share": {k: v / warm_total for k, v in self.warm_timers.items()} if warm_total else None,
            "train_samples": len(self.train_set),
            "val_samples": len(self.val_set),
            "wall_s": self.elapsed,
            "run_dir": str(self.run_dir),
        }


def _progress(total: int, initial: int, desc: str, enabled: Optional[bool]):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", leave=False,
                disable=None if enabled is None else not enabled, dynamic_ncols=True)
