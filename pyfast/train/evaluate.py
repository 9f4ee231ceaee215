"""Validation: how much better the refined boxes and masks are than the input boxes.

    result = validate(run)    # val_iou_input, val_iou_refined, val_mask_iou, val_ap_input,
                              # val_ap_refined, val_boxes

Mean IoU with the ground truth of the input and the refined boxes and the mask IoU are running
sums on the device. COCO box AP (`pyfast.evaluation.coco_box_ap`) needs every box of the set at
once: it keeps small per-image numpy arrays (never tensors with graphs or devices), bounded by the
validation set, and scores every box 1 so that AP measures localization alone, for the input and
the refined boxes alike.

With several ranks each rank evaluates a contiguous share of the validation set; the sums (and the
cache and skipped-sample tallies) are all-reduced, and the per-image boxes are gathered on rank 0 in
rank order, which is the set's own order, so AP is the same whatever the world size. Only rank 0's
result holds the AP.

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
        sums += torch.stack([
            pyfast.box_iou(inputs.boxes, inputs.gt).sum(), pyfast.box_iou(refined, inputs.gt).sum(),
            pyfast.mask_iou(out.mask_logits, target).float().sum(), torch.tensor(float(len(refined)), device=device),
        ]).double()  # fmt: skip
        host = torch.cat([inputs.gt, inputs.boxes, refined], dim=1).cpu().numpy()
        splits = np.cumsum(torch.bincount(batch.box_sample, minlength=len(batch)).tolist())[:-1]
        for rows in np.split(host, splits):
            per_image["gt"].append(rows[:, 0:4])
            per_image["input"].append(rows[:, 4:8])
            per_image["refined"].append(rows[:, 8:12])


@torch.no_grad()
def validate(run) -> dict:
    world = run.world
    phase = run.stats.phase(run.progress.epoch)
    sums = torch.zeros(4, dtype=torch.float64, device=run.device)  # IoU input, IoU refined, mask IoU, boxes
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
    (iou_in, iou_ref, mask_iou, count), _, counts = world.sum_and_read(sums, tally.counts())
    tally.set_counts(counts)
    if tally.failed:
        world.agree()  # raises on every rank
    record_skipped(run, tally)
    phase.cache.add(tally)
    run.stats.backbone_samples += tally.backbone
    boxes = int(count)
    count = max(count, 1.0)
    result = {
        "val_iou_input": iou_in / count,
        "val_iou_refined": iou_ref / count,
        "val_mask_iou": mask_iou / count,
        "val_boxes": boxes,
    }
    shares = world.gather(per_image)  # rank order is the validation set's order
    if shares is not None:
        every = {name: [rows for share in shares for rows in share[name]] for name in per_image}
        if every["gt"]:
            result["val_ap_input"] = coco_box_ap(every["gt"], every["input"])["AP"]
            result["val_ap_refined"] = coco_box_ap(every["gt"], every["refined"])["AP"]
    return result
