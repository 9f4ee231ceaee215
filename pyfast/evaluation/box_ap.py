"""Class-agnostic COCO box AP through pycocotools' COCOeval, from in-memory boxes."""

from __future__ import annotations

import contextlib
import io
import math
from typing import Dict, Optional, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# COCOeval.stats order for iouType="bbox".
_STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")


def _as_boxes(array, argument: str, image: int) -> np.ndarray:
    boxes = np.asarray(array, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{argument}[{image}] has shape {boxes.shape}, expected (K, 4) xyxy")
    if not np.isfinite(boxes).all():
        raise ValueError(f"{argument}[{image}] has non-finite boxes")
    return boxes


def _coco_from(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        coco.createIndex()
    return coco


def coco_box_ap(
    gt_boxes: Sequence[np.ndarray],
    pred_boxes: Sequence[np.ndarray],
    scores: Optional[Sequence[np.ndarray]] = None,
) -> Dict[str, float]:
    """COCO box AP, AP50, AP75 (and by size) of `pred_boxes` against `gt_boxes`, one class.

    gt_boxes, pred_boxes: one (K, 4) xyxy array per image; scores: one (K,) array per image
    (default 1 for every box, e.g. when refining given boxes). A metric COCOeval cannot define
    (no ground truth in that range) is NaN.
    """
    if len(gt_boxes) != len(pred_boxes):
        raise ValueError(f"gt_boxes has {len(gt_boxes)} images, pred_boxes has {len(pred_boxes)}")
    if scores is not None and len(scores) != len(pred_boxes):
        raise ValueError(f"scores has {len(scores)} images, pred_boxes has {len(pred_boxes)}")

    images, gt_annotations, detections = [], [], []
    max_detections = 100
    for image_id, (gt, pred) in enumerate(zip(gt_boxes, pred_boxes), start=1):
        gt = _as_boxes(gt, "gt_boxes", image_id - 1)
        pred = _as_boxes(pred, "pred_boxes", image_id - 1)
        if scores is None:
            score = np.ones(len(pred))
        else:
            score = np.asarray(scores[image_id - 1], dtype=np.float64).reshape(-1)
            if score.shape != (len(pred),):
                raise ValueError(f"scores[{image_id - 1}] has {score.size} values for {len(pred)} boxes")
        max_detections = max(max_detections, len(pred))
        images.append({"id": image_id})
        for target, boxes, kind in ((gt_annotations, gt, "gt"), (detections, pred, "dt")):
            for number, (x1, y1, x2, y2) in enumerate(boxes):
                w, h = max(x2 - x1, 0.0), max(y2 - y1, 0.0)
                entry = {
                    "id": len(target) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "bbox": [float(x1), float(y1), float(w), float(h)],
                    "area": float(w * h),
                    "iscrowd": 0,
                }
                if kind == "dt":
                    entry["score"] = float(score[number])
                target.append(entry)

    categories = [{"id": 1, "name": "object"}]
    gt_coco = _coco_from({"images": images, "annotations": gt_annotations, "categories": categories})
    # Built by hand rather than with loadRes, which rejects an empty detection list.
    dt_coco = _coco_from({"images": images, "annotations": detections, "categories": categories})
    evaluator = COCOeval(gt_coco, dt_coco, iouType="bbox")
    # Refined boxes are one per object: never cut an image's detections at COCO's default 100.
    evaluator.params.maxDets = [1, 10, max_detections]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: (float(value) if value >= 0 else math.nan) for name, value in zip(_STAT_NAMES, evaluator.stats)}
