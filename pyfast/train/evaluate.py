"""Validation: how much better the refined boxes and masks are than the input boxes.

    result = validate(run)    # val_iou_input, val_iou_refined, val_mask_iou, val_ap_input,
                              # val_ap_refined, val_boxes, val_nonfinite_boxes

Mean IoU with the ground truth of the input and the refined boxes and the mask IoU are running
sums on the device. COCO box AP (`pyfast.evaluation.coco_box_ap`) needs every box of the set at
once: it keeps small per-image numpy arrays (never tensors with graphs or devices), bounded by the
validation set, and scores every box 1 so that AP measures localization alone, for the input and
the refined boxes alike.

A model that diverged may output non-finite boxes. They are counted (`val_nonfinite_boxes`), score
IoU 0 and count as missed detections in AP, and the log says so; validation never fails on them.

With several ranks each rank evaluates a contiguous share of the validation set; the sums (the
non-finite count among them, and the cache and skipped-sample tallies) are all-reduced, and the
per-image boxes are gathered on rank 0 in rank order, which is the set's own order, so AP is the
same whatever the world size. Only rank 0's result holds the AP.

Host syncs: one per validation batch (its boxes for AP), one for the sums at the end, and, for
fresh features computed without a cache, one per batch to check them.
"""

from __future__ import annotations

import numpy as np
import torch

import pyfast
from pyfast.evaluation import coco_box_ap
from pyfast.train.jitter import VAL_EPOCH
from pyfast.train.objective import mask_targets
from pyfast.train.state import StepTally
from pyfast.train.step import batch_inputs, record_skipped


def _evaluate_share(run, sums: torch.Tensor, per_image: dict, tally: StepTally) -> None:
    """This rank's share of the validation set: sums (in place) and per-image boxes."""
    model, device = run.model, run.device
    for batch in run.data.loader(run.data.val_batches()):
        tally.add_batch(batch)
        if not len(batch):
            continue
        features = run.features(batch)
        if features.check is not None:
            run.features.raise_if_bad(features.check.cpu(), batch, batch.image_rows.tolist())
        if not batch.num_boxes:
            continue
        inputs = batch_inputs(run, batch, VAL_EPOCH)
        with run.autocast():
            out = model(features.maps, inputs.boxes, inputs.index)
        target = mask_targets(inputs.masks, out.rois, out.mask_logits.shape[-1])
        refined = out.refined.float()
        finite = torch.isfinite(refined).all(dim=1)
        clean = torch.where(finite[:, None], refined, inputs.boxes)  # finite stand-ins, masked out below
        iou_refined = torch.where(finite, pyfast.box_iou(clean, inputs.gt), 0.0)
        sums += torch.stack([
            pyfast.box_iou(inputs.boxes, inputs.gt).sum(), iou_refined.sum(),
            pyfast.mask_iou(out.mask_logits, target).float().sum(), torch.tensor(float(len(refined)), device=device),
            (~finite).sum().float(),
        ]).double()  # fmt: skip
        host = torch.cat([inputs.gt, inputs.boxes, clean, finite[:, None].float()], dim=1).cpu().numpy()
        splits = np.cumsum(torch.bincount(batch.box_sample, minlength=len(batch)).tolist())[:-1]
        for rows in np.split(host, splits):
            keep = rows[:, 12] > 0
            per_image["gt"].append(rows[:, 0:4])
            per_image["input"].append(rows[:, 4:8])
            per_image["refined"].append(rows[keep, 8:12])


@torch.no_grad()
def validate(run) -> dict:
    world = run.world
    phase = run.stats.phase(run.progress.epoch)
    # IoU input, IoU refined, mask IoU, boxes, non-finite refined boxes
    sums = torch.zeros(5, dtype=torch.float64, device=run.device)
    per_image: dict[str, list[np.ndarray]] = {"gt": [], "input": [], "refined": []}
    tally = StepTally()
    computed = run.features.computed
    run.model.eval()
    try:
        world.attempt(_evaluate_share, run, sums, per_image, tally)
    finally:
        run.model.train()
    tally.backbone = run.features.computed - computed
    tally.failed = int(world.pending is not None)
    (iou_in, iou_ref, mask_iou, count, nonfinite), _, counts = world.sum_and_read(sums, tally.counts())
    tally.set_counts(counts)
    if tally.failed:
        world.agree()  # raises on every rank
    record_skipped(run, tally)
    phase.cache.add(tally)
    run.stats.backbone_samples += tally.backbone
    bad = int(nonfinite)
    boxes = int(count)
    count = max(count, 1.0)
    result = {
        "val_iou_input": iou_in / count,
        "val_iou_refined": iou_ref / count,
        "val_mask_iou": mask_iou / count,
        "val_boxes": boxes,
        "val_nonfinite_boxes": bad,
    }
    shares = world.gather(per_image)  # rank order is the validation set's order
    if shares is not None:
        every = {name: [rows for share in shares for rows in share[name]] for name in per_image}
        if every["gt"]:
            result["val_ap_input"] = coco_box_ap(every["gt"], every["input"])["AP"]
            result["val_ap_refined"] = coco_box_ap(every["gt"], every["refined"])["AP"]
    if bad:
        run.log(f"warning: validation at step {run.progress.step}: {bad} of {boxes} refined boxes are non-finite "
                "(the model diverged; they count as IoU 0 and missed detections)")
    return result
