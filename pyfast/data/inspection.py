"""Inspection of loaded samples for data that trains but looks wrong, and the tally of a data scan.

`inspect_objects` is numpy over whole arrays (two `any` reductions of the masks, no Python loop
over pixels or objects), cheap enough for every sample a training run loads. `InspectingDataset`
runs it in the DataLoader workers of a scan, so only verdicts, never pixels, travel back.

Per-object warnings, on the supervised boxes and masks (frame 2 of a paired sample):

- box outside the image: it does not overlap the image at all;
- box partly outside the image: an edge lies more than EDGE_TOLERANCE_PX past the image;
- zero-area box: x2 == x1 or y2 == y1;
- empty mask: a box with area inside the image, but no mask pixel;
- mask disagrees with its box: the IoU of the box (clipped to the image) and the mask's bounding
  box, each grown by MASK_BOX_SLACK_PX per side so that rasterizing a small object is not
  flagged, is below MASK_BOX_MIN_IOU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import Dataset

from .findings import (
    BOX_OUTSIDE,
    BOX_PARTLY_OUTSIDE,
    DUPLICATE_CONTENT,
    EMPTY_MASK,
    MASK_BOX_MISMATCH,
    ZERO_AREA_BOX,
    Finding,
    FindingsReport,
)
from .sample import Sample, SkippedSample
from .source import Source
from .validate import format_box

EDGE_TOLERANCE_PX = 1.0
MASK_BOX_MIN_IOU = 0.5
MASK_BOX_SLACK_PX = 1.0


def mask_boxes(masks: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Tight xyxy boxes (pixel edges, float64 (K, 4)) of bool (K, H, W) masks, and which are non-empty
    (an empty mask's box is all zeros)."""
    count, height, width = masks.shape
    rows = masks.any(axis=2)  # (K, H)
    cols = masks.any(axis=1)  # (K, W)
    nonempty = rows.any(axis=1)
    boxes = np.zeros((count, 4), dtype=np.float64)
    if count:
        boxes[:, 0] = cols.argmax(axis=1)
        boxes[:, 1] = rows.argmax(axis=1)
        boxes[:, 2] = width - cols[:, ::-1].argmax(axis=1)
        boxes[:, 3] = height - rows[:, ::-1].argmax(axis=1)
        boxes[~nonempty] = 0.0
    return boxes, nonempty


def _paired_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    width = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0.0, None)
    height = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0.0, None)
    inter = width * height
    union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def inspect_objects(boxes: np.ndarray, masks: np.ndarray) -> Tuple[Dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Per-object warning flags of validated (K, 4) xyxy boxes and bool (K, H, W) masks.

    Returns ({kind: bool (K,)}, the masks' boxes, the box-mask IoUs), the last two for messages.
    """
    _, height, width = masks.shape
    coords = boxes.astype(np.float64)
    x1, y1, x2, y2 = coords.T
    zero_area = (x2 <= x1) | (y2 <= y1)
    outside = (x2 <= 0) | (y2 <= 0) | (x1 >= width) | (y1 >= height)
    tolerance = EDGE_TOLERANCE_PX
    partly = ~outside & ((x1 < -tolerance) | (y1 < -tolerance) | (x2 > width + tolerance) | (y2 > height + tolerance))
    drawn, nonempty = mask_boxes(masks)
    has_area = ~zero_area & ~outside
    slack = np.array([-MASK_BOX_SLACK_PX, -MASK_BOX_SLACK_PX, MASK_BOX_SLACK_PX, MASK_BOX_SLACK_PX])
    clipped = np.clip(coords, 0.0, np.array([width, height, width, height], dtype=np.float64))
    iou = _paired_iou(clipped + slack, drawn + slack)
    flags = {
        BOX_OUTSIDE: outside,
        BOX_PARTLY_OUTSIDE: partly,
        ZERO_AREA_BOX: zero_area,
        EMPTY_MASK: has_area & ~nonempty,
        MASK_BOX_MISMATCH: has_area & nonempty & (iou < MASK_BOX_MIN_IOU),
    }
    return flags, drawn, iou


def inspect_sample(sample: Sample, annotation_ids: Optional[np.ndarray] = None) -> List[Finding]:
    """The warnings of one loaded sample, each naming its object (and COCO annotation id)."""
    height, width = sample.masks.shape[1:]
    flags, drawn, iou = inspect_objects(sample.boxes, sample.masks)
    image = f"the {height}x{width} (HxW) image"
    findings = []
    for kind, flagged in flags.items():
        for k in np.flatnonzero(flagged).tolist():
            box = format_box(sample.boxes[k])
            detail = {
                BOX_OUTSIDE: f"box {box} lies outside {image}",
                BOX_PARTLY_OUTSIDE: f"box {box} extends past {image}",
                ZERO_AREA_BOX: f"box {box} has zero area",
                EMPTY_MASK: f"box {box} has an empty mask",
                MASK_BOX_MISMATCH: f"the mask spans {format_box(drawn[k])}, IoU {iou[k]:.2f} with the box {box} "
                f"(< {MASK_BOX_MIN_IOU:g})",
            }[kind]
            annotation = None
            if annotation_ids is not None and annotation_ids[k] >= 0:
                annotation = int(annotation_ids[k])
            findings.append(Finding(kind, sample.source, sample.file, detail, object=k, annotation=annotation))
    return findings


def index_findings(sources: Sequence[Source]) -> List[Finding]:
    """What every source's index found (COCO annotations dropped, duplicate entries)."""
    return [finding for source in sources for finding in source.index_findings()]


@dataclass
class Verdict:
    """What a scan's worker sends back for one sample: its skip record, or its key and warnings."""

    index: int
    skipped: Optional[SkippedSample] = None
    key: str = ""
    source: str = ""
    file: str = ""
    findings: List[Finding] = field(default_factory=list)


class InspectingDataset(Dataset):
    """Wraps a RobustDataset of raw samples: item i is the Verdict on sample i."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Verdict:
        item = self.dataset[index]
        if isinstance(item, SkippedSample):
            return Verdict(index, skipped=item)
        source, local = self.dataset.locate(index)
        return Verdict(index, key=item.key, source=item.source, file=item.file,
                       findings=inspect_sample(item, source.annotation_ids(local)))


def collect_verdicts(verdicts: List[Verdict]) -> List[Verdict]:
    """`collate_fn` for an InspectingDataset: the batch's verdicts as they are."""
    return list(verdicts)


class ScanTally:
    """Adds up a scan's verdicts: good samples, skip records, and findings into `findings` (the
    sources' index findings first, then per-sample warnings and samples whose content repeats an
    earlier one's, found by their content keys)."""

    def __init__(self, sources: Sequence[Source], findings: FindingsReport):
        self.ok = 0
        self.skipped: List[SkippedSample] = []
        self.findings = findings
        self.findings.add(index_findings(sources))
        self._first_seen: Dict[str, Tuple[str, str]] = {}

    def add(self, verdicts: Sequence[Verdict]) -> List[SkippedSample]:
        """Tally one batch; returns its skip records (for a SkipTracker)."""
        skipped = [verdict.skipped for verdict in verdicts if verdict.skipped is not None]
        self.ok += len(verdicts) - len(skipped)
        self.skipped.extend(skipped)
        for verdict in verdicts:
            if verdict.skipped is not None:
                continue
            self.findings.add(verdict.findings)
            first = self._first_seen.setdefault(verdict.key, (verdict.source, verdict.file))
            if first != (verdict.source, verdict.file):
                self.findings.add([Finding(DUPLICATE_CONTENT, verdict.source, verdict.file,
                                           f"same content as {first[0]}: {first[1]}")])
        return skipped
