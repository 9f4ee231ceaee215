"""One optimizer step: features, forward, loss, backward over its micro-batches, then the update.

Host syncs: one per step. The loss, its parts, the batch IoUs, the gradient norm (and, for fresh
features computed without a cache, their pack statistics) are stacked on the device and read back
together; that read decides whether the step is applied (finite loss and gradient) or skipped and
counted (no parameter, optimizer, scheduler or scaler-step change; the fp16 scaler lowers its
scale). A cold batch with a cache adds the feature path's one read (see `pyfast.train.features`).

With several ranks the heads run under DistributedDataParallel: the last backward of the step
all-reduces the gradients (the micro-batches before it accumulate under `no_sync`), and a rank with
nothing to learn from joins that all-reduce with zeros. The one host read is then preceded by the
step's control all-reduce, which sums over the ranks the weighted losses, a non-finite flag, the
bad-feature counts and the host tallies (cache lookups, samples, skipped records, stop requests,
failures): every rank reads the same totals, so every rank applies or skips the step alike, stops
at the same step, and records the same statistics. Each rank's loss is scaled by its share of the
micro-batch slot (`pyfast.train.sharding`), so a short last slot averages over its samples.

Fault injection (tests, debugging): `loss_hook(step, loss) -> loss` is called on each micro-batch's
loss before backward, `step` being the 1-based optimizer step being computed.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

import pyfast
from pyfast.data import Batch
from pyfast.train.distributed import everywhere
from pyfast.train.jitter import box_noise, jitter_boxes
from pyfast.train.objective import loss_part_names, refiner_loss
from pyfast.train.state import StepTally, StepTimes

LossHook = Optional[Callable[[int, torch.Tensor], torch.Tensor]]


@dataclass
class StepResult:
    """What one optimizer step did (over every rank).

    applied: the loss and gradient were finite, so parameters, optimizer and scheduler moved.
    loss, parts: the mean over the step's micro-batches; grad_norm: before clipping (unscaled).
    iou_input, iou_refined: mean IoU with the ground truth of the jittered input and the refined boxes.
    lr: the learning rate the step used; boxes: boxes trained on; samples: `source: file, ...` of
    this rank's samples of the step (what the log names when a step is skipped).
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


@dataclass
class _Local:
    """This rank's part of a step, before the control all-reduce."""

    total: Optional[torch.Tensor] = None  # weighted sum of [loss, *parts, iou input, iou refined]
    weight: float = 0.0  # sum of the weights of the micro-batches that held boxes
    used: int = 0  # micro-batches that held boxes
    boxes: int = 0
    synced: bool = False  # the backward that all-reduces the gradients ran
    checks: list = field(default_factory=list)  # (pack statistics, batch) of fresh features to check


def _forward_backward(run, batches: list[Batch], epoch: int, times: StepTimes, loss_hook: LossHook, local: _Local) -> None:
    model, cfg, ddp = run.model, run.cfg, run.ddp
    micro_count = len(batches)
    with_boxes = [i for i, batch in enumerate(batches) if len(batch) and batch.num_boxes]
    last = with_boxes[-1] if with_boxes else None
    for i, batch in enumerate(batches):
        if not len(batch):
            continue
        t0 = time.perf_counter()
        features = run.features(batch)  # also fills the cache for samples without boxes
        if features.check is not None:
            local.checks.append((features.check, batch))
        if not batch.num_boxes:
            times.features += time.perf_counter() - t0
            continue
        inputs = batch_inputs(run, batch, epoch)
        weight = run.data.weight(run.progress.micro + i)
        syncs = ddp is not None and i == last  # only the step's last backward all-reduces the gradients
        t1 = time.perf_counter()
        with ddp.no_sync() if ddp is not None and not syncs else contextlib.nullcontext():
            with run.autocast():
                out = (ddp if ddp is not None else model)(features.maps, inputs.boxes, inputs.index)
                loss, parts = refiner_loss(out, inputs.gt, inputs.masks, cfg.image_size, run.weights)
            if loss_hook is not None:
                loss = loss_hook(run.progress.step + 1, loss)
            t2 = time.perf_counter()
            scaled = run.scaler.scale((loss if weight == 1.0 else loss * weight) / micro_count)
            if syncs:
                run.world.collective("the gradient all-reduce", scaled.backward)
            else:
                scaled.backward()
        local.synced = local.synced or syncs
        t3 = time.perf_counter()
        with torch.no_grad():
            values = torch.stack([
                loss.detach().float(), *[p.float() for p in parts.values()],
                pyfast.box_iou(inputs.boxes, inputs.gt).mean(), pyfast.box_iou(out.refined.detach(), inputs.gt).mean(),
            ])  # fmt: skip
        if weight != 1.0:
            values = values * weight
        local.total = values if local.total is None else local.total + values
        local.weight += weight
        local.used += 1
        local.boxes += batch.num_boxes
        times.features += t1 - t0
        times.forward_loss += t2 - t1
        times.backward += t3 - t2


def record_skipped(run, tally: StepTally) -> None:
    """The skipped-sample records of every rank (gathered when `tally` counts any over the ranks),
    counted once on every rank; rank 0 logs them. Raises TooManyBadSamples on every rank alike."""
    if not tally.skipped:
        return
    records = tally.records
    if run.world.size > 1:
        records = [record for part in run.world.all_gather(tally.records) for record in part]
    with everywhere():
        run.skips.record(records)


def train_step(
    run, batches: list[Batch], epoch: int, times: StepTimes, loss_hook: LossHook = None, tally: Optional[StepTally] = None
) -> StepResult | None:
    """One optimizer step over `batches` (this rank's micro-batches of the step); adds its time to `times`.

    tally: this rank's host counts of the step (default: counted from `batches`); on return it holds
    the totals over the ranks. Returns None when no micro-batch of any rank held a box (nothing to
    learn from; no step taken).
    """
    model, cfg, world, ddp = run.model, run.cfg, run.world, run.ddp
    tally = tally if tally is not None else StepTally.of(batches)
    local = _Local()
    computed = run.features.computed
    world.attempt(_forward_backward, run, batches, epoch, times, loss_hook, local)
    t0 = time.perf_counter()
    if ddp is not None and not local.synced:  # nothing (more) to learn from here: join the all-reduce with zeros
        world.collective("the gradient all-reduce", lambda: ddp(None).backward())
    tally.backbone = run.features.computed - computed
    tally.failed = int(world.pending is not None)

    optimizer, scaler = run.optimizer, run.scaler
    lr = optimizer.param_groups[0]["lr"]
    names = loss_part_names(cfg.iou_head)
    has_grads = ddp is not None or local.used > 0
    norm = torch.zeros((), device=run.device)
    if has_grads:
        params = [p for p in model.parameters() if p.grad is not None]
        scaler.unscale_(optimizer)
        if params:
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm if cfg.clip_norm > 0 else float("inf"))
    total = local.total if local.total is not None else torch.zeros(len(names) + 3, device=run.device)
    nonfinite = torch.logical_not(torch.isfinite(total[0]) & torch.isfinite(norm))
    bad = torch.stack([c.sum() for c, _ in local.checks]).sum() if local.checks else torch.zeros((), device=run.device)
    summed = torch.cat([total.double(), nonfinite.double().reshape(1), bad.double().reshape(1)])
    counts = [local.weight, local.used, local.boxes, *tally.counts()]
    # the one host sync of the step (with several ranks, after the control all-reduce)
    summed, mine, counts = world.sum_and_read(summed, counts, norm.double().reshape(1))
    weight, used, boxes = counts[0], int(counts[1]), int(counts[2])
    tally.set_counts(counts[3:])

    if tally.failed:
        world.agree()  # raises on every rank: this rank's own failure, or RankFailed
    record_skipped(run, tally)
    if summed[-1] > 0:  # fresh features out of range: name the map and the sample (an error path: more reads are fine)
        for check, batch in local.checks:
            world.attempt(run.features.raise_if_bad, check.cpu(), batch, batch.image_rows.tolist())
        world.agree()
    if used == 0:  # no micro-batch of any rank held a box
        if has_grads and scaler.is_enabled():
            scaler.update()  # closes the unscale_ above (the scale's growth counter moves by one)
        optimizer.zero_grad(set_to_none=True)
        times.optimizer += time.perf_counter() - t0
        return None
    n = len(names)
    mean = [v / weight for v in summed[: n + 3]]
    loss_value, part_values, (iou_input, iou_refined) = mean[0], mean[1 : 1 + n], mean[1 + n : 3 + n]
    applied = summed[n + 3] == 0  # finite loss and gradient on every rank
    if applied:
        scaler.step(optimizer)
        scaler.update()
        run.scheduler.step()
    elif scaler.is_enabled():
        scaler.update()  # lowers the scale; the scheduler does not move
        if math.isfinite(loss_value):
            run.stats.scaler_skips += 1
    optimizer.zero_grad(set_to_none=True)
    times.optimizer += time.perf_counter() - t0
    return StepResult(
        applied=applied, loss=loss_value, parts=dict(zip(names, part_values)), grad_norm=mine[0],
        iou_input=iou_input, iou_refined=iou_refined, lr=lr, boxes=boxes,
        samples="; ".join(batch.describe() for batch in batches if len(batch)),
    )
