"""One optimizer step: features, forward, loss, backward over its micro-batches, then the update.

Host syncs: one per step. The loss, its parts, the batch IoUs, the gradient norm (and, for fresh
features computed without a cache, their pack statistics) are stacked on the device and read back
together; that read decides whether the step is applied (finite loss and gradient) or skipped and
counted (no parameter, optimizer, scheduler or scaler-step change; the fp16 scaler lowers its
scale). A cold batch with a cache adds the feature path's one read (see `pyfast.train.features`).

Fault injection (tests, debugging): `loss_hook(step, loss) -> loss` is called on each micro-batch's
loss before backward, `step` being the 1-based optimizer step being computed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import pyfast
from pyfast.data import Batch
from pyfast.train.jitter import box_noise, jitter_boxes
from pyfast.train.objective import refiner_loss
from pyfast.train.state import StepTimes

LossHook = Optional[Callable[[int, torch.Tensor], torch.Tensor]]


@dataclass
class StepResult:
    """What one optimizer step did.

    applied: the loss and gradient were finite, so parameters, optimizer and scheduler moved.
    loss, parts: the mean over the step's micro-batches; grad_norm: before clipping (unscaled).
    iou_input, iou_refined: mean IoU with the ground truth of the jittered input and the refined boxes.
    lr: the learning rate the step used; boxes: boxes trained on; samples: `source: file, ...` of
    the step's samples (what the log names when a step is skipped).
    """

    applied: bool
    loss: float
    parts: dict
    grad_norm: float
    iou_input: float
    iou_refined: float
    lr: float
    boxes: int
    samples: str


@dataclass
class Inputs:
    """A batch's boxes on the device: jittered input boxes, their sample index, ground truth, masks."""

    boxes: torch.Tensor
    index: torch.Tensor
    gt: torch.Tensor
    masks: torch.Tensor


def batch_inputs(run, batch: Batch, epoch: int) -> Inputs:
    """Non-blocking copies of the batch's pinned tensors; input-box noise from (seed, epoch, sample)."""
    device, cfg = run.device, run.cfg
    counts = torch.bincount(batch.box_sample, minlength=len(batch)).tolist()  # a CPU tensor: no sync
    noise = box_noise(batch.indices.tolist(), counts, seed=cfg.seed, epoch=epoch)
    if device.type == "cuda":
        noise = noise.pin_memory()
    prompts = batch.prompt_boxes.to(device, non_blocking=True)
    return Inputs(
        boxes=jitter_boxes(prompts, noise, shift=cfg.jitter_shift, scale=cfg.jitter_scale, image_size=cfg.image_size),
        index=batch.box_sample.to(device, non_blocking=True),
        gt=batch.boxes.to(device, non_blocking=True),
        masks=batch.masks.to(device, non_blocking=True),
    )


def train_step(run, batches: list[Batch], epoch: int, times: StepTimes, loss_hook: LossHook = None) -> StepResult | None:
    """One optimizer step over `batches` (its micro-batches); adds its time to `times`.

    Returns None when none of the micro-batches held a box (nothing to learn from; no step taken).
    """
    model, cfg = run.model, run.cfg
    micro_count = len(batches)
    total: torch.Tensor | None = None
    part_names: list[str] = []
    used, boxes, checks = 0, 0, []
    for batch in batches:
        if not len(batch):
            continue
        t0 = time.perf_counter()
        features = run.features(batch)  # also fills the cache for samples without boxes
        if features.check is not None:
            checks.append((features.check, batch))
        if not batch.num_boxes:
            times.features += time.perf_counter() - t0
            continue
        inputs = batch_inputs(run, batch, epoch)
        t1 = time.perf_counter()
        with run.autocast():
            out = model(features.maps, inputs.boxes, inputs.index)
            loss, parts = refiner_loss(out, inputs.gt, inputs.masks, cfg.image_size, run.weights)
        if loss_hook is not None:
            loss = loss_hook(run.progress.step + 1, loss)
        t2 = time.perf_counter()
        run.scaler.scale(loss / micro_count).backward()
        t3 = time.perf_counter()
        with torch.no_grad():
            values = torch.stack([
                loss.detach().float(), *[p.float() for p in parts.values()],
                pyfast.box_iou(inputs.boxes, inputs.gt).mean(), pyfast.box_iou(out.refined.detach(), inputs.gt).mean(),
            ])  # fmt: skip
        total = values if total is None else total + values
        part_names = list(parts)
        used += 1
        boxes += batch.num_boxes
        times.features += t1 - t0
        times.forward_loss += t2 - t1
        times.backward += t3 - t2

    t0 = time.perf_counter()
    if used == 0:
        run.optimizer.zero_grad(set_to_none=True)
        for check, batch in checks:
            run.features.raise_if_bad(check.cpu(), batch, batch.image_rows.tolist())
        times.optimizer += time.perf_counter() - t0
        return None
    optimizer, scaler = run.optimizer, run.scaler
    lr = optimizer.param_groups[0]["lr"]
    params = [p for p in model.parameters() if p.grad is not None]
    scaler.unscale_(optimizer)
    max_norm = cfg.clip_norm if cfg.clip_norm > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros((), device=run.device)
    bad_features = [torch.stack([c.sum() for c, _ in checks]).sum().float().reshape(1)] if checks else []
    host = torch.cat([total / used, norm.reshape(1).float(), *bad_features]).tolist()  # the one host sync of the step
    if checks and host[-1] > 0:
        for check, batch in checks:  # name the map and the sample (an error path: more reads are fine)
            run.features.raise_if_bad(check.cpu(), batch, batch.image_rows.tolist())
    n = len(part_names)
    loss_value, part_values, (iou_input, iou_refined), grad_norm = host[0], host[1 : 1 + n], host[1 + n : 3 + n], host[3 + n]
    loss_finite = math.isfinite(loss_value)
    applied = loss_finite and math.isfinite(grad_norm)
    if applied:
        scaler.step(optimizer)
        scaler.update()
        run.scheduler.step()
    elif scaler.is_enabled():
        scaler.update()  # lowers the scale; the scheduler does not move
        if loss_finite:
            run.stats.scaler_skips += 1
    optimizer.zero_grad(set_to_none=True)
    times.optimizer += time.perf_counter() - t0
    return StepResult(
        applied=applied, loss=loss_value, parts=dict(zip(part_names, part_values)), grad_norm=grad_norm,
        iou_input=iou_input, iou_refined=iou_refined, lr=lr, boxes=boxes,
        samples="; ".join(batch.describe() for batch in batches if len(batch)),
    )
