"""The records that flow out of a source: a good `Sample`, or the reason it could not be one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np


@dataclass
class Sample:
    """One training sample, already validated.

    image: uint8 (H, W, 3), the image the features come from (frame 2 of a paired sample); None
        when the source was told to skip it because its features are cached (see
        `Source.load(index, skip_image=...)`): the sample then carries only its targets.
    prompt_boxes: float32 (K, 4) xyxy pixels fed to the head (frame 1's boxes for a paired
        sample, else the ground-truth boxes, which the training loop jitters).
    boxes: float32 (K, 4) xyxy pixels, the ground truth the head is supervised on.
    masks: bool (K, H, W), the ground-truth masks, in the same order as boxes.
    key: the sample's feature-cache key (never an absolute path or a device).
    source: the name of the source it came from; file: its file relative to the source root.
    image_size: (H, W) of the image; taken from `image` when not given.
    """

    image: Optional[np.ndarray]
    prompt_boxes: np.ndarray
    boxes: np.ndarray
    masks: np.ndarray
    key: str
    source: str
    file: str
    image_size: Optional[Tuple[int, int]] = None

    def __post_init__(self) -> None:
        if self.image_size is None:
            if self.image is None:
                raise ValueError("a Sample without an image needs image_size")
            self.image_size = (int(self.image.shape[0]), int(self.image.shape[1]))

    @property
    def num_objects(self) -> int:
        return int(self.boxes.shape[0])


class BadSample(Exception):
    """A sample failed to load or validate. `reason` says what is wrong with it; `category` is
    a short fixed phrase ("missing key", "bad masks", ...) that reports group by."""

    def __init__(self, reason: str, *, category: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.category = category or reason


@dataclass(frozen=True)
class SkippedSample:
    """What the dataset returns in place of a sample that failed: enough to report and dedupe it.
    `index` is the global dataset index, so (source, index) names the sample across epochs."""

    source: str
    file: str
    reason: str
    index: int
    category: str = ""

    def as_record(self) -> dict:
        return {
            "source": self.source,
            "file": self.file,
            "reason": self.reason,
            "category": self.category or self.reason,
            "index": self.index,
        }
