"""The data side of a capture: images from `--data` sources, batched in a fixed order.

`CaptureImages` letterboxes each sample's image exactly as pyfast-train does (`Letterbox`),
without the boxes and masks a capture does not need. Batches are fixed ranges of the data set
([k*B, (k+1)*B), skipped samples left out), whatever sample a run starts from: a resumed capture
computes the batch it restarts in exactly as the uninterrupted one did, so its shards come out
byte-identical. Bad samples come back as `SkippedSample` records, as in training.

Any map-style dataset can be captured: items are `SkippedSample` records or objects with `image`
((3, S, S) uint8 tensor, or float in [0, 1]), `key` (str) and optionally `source` and `file`. Its identity in the
manifest is its size and, when it has one, `fingerprint()` (a JSON value naming its content): give
your dataset one, or a changed data set of the same size resumes as if it were the same.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch
import xxhash
from torch.utils.data import Dataset, Sampler

from pyfast.capture.errors import CaptureError
from pyfast.data import GENERATOR_VERSION, Letterbox, RobustDataset, Sample, SkippedSample


@dataclass
class CaptureItem:
    image: torch.Tensor  # uint8 (3, S, S) as letterboxed, or float in [0, 1]
    key: str
    source: str = ""
    file: str = ""


class CaptureImages:
    """Preprocess for RobustDataset: a Sample -> its letterboxed image (a CaptureItem)."""

    def __init__(self, size: int):
        self.letterbox = Letterbox(size)
        self.size = self.letterbox.size

    def fingerprint(self) -> dict:
        return self.letterbox.fingerprint()

    def __call__(self, sample: Sample) -> CaptureItem:
        height, width = sample.image.shape[:2]
        no_boxes = np.zeros((0, 4), dtype=np.float32)
        image_only = dataclasses.replace(sample, boxes=no_boxes, prompt_boxes=no_boxes,
                                         masks=np.zeros((0, height, width), dtype=bool))
        out = self.letterbox(image_only)
        return CaptureItem(out.image, out.key, out.source, out.file)


def images_dataset(sources, image_size: int) -> RobustDataset:
    """The data set a capture reads from opened `--data` sources."""
    return RobustDataset(sources, preprocess=CaptureImages(image_size))


def _digest(items) -> str:
    h = xxhash.xxh3_128()
    for item in items:
        h.update(str(item).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def data_section(dataset) -> dict:
    """The manifest's `data` section: per source its kind, size and a digest of its sample list
    (the keys, for sources that compute them without loading the sample, as synthetic does;
    otherwise the files relative to the source root), and the preprocessing. Source labels (with
    their paths) are recorded but not compared: a moved data folder still resumes."""
    sources = getattr(dataset, "sources", None)
    preprocess = getattr(dataset, "preprocess", None)
    fingerprint = getattr(preprocess, "fingerprint", None)
    described = []
    if sources is not None:
        for source in sources:
            key = getattr(source, "key", None)
            items = (key(i) for i in range(len(source))) if callable(key) else (source.describe(i) for i in range(len(source)))
            entry = {"label": source.name, "kind": getattr(source, "kind", type(source).__name__),
                     "samples": len(source), "items": _digest(items)}
            if entry["kind"] == "synthetic":
                entry["generator"] = GENERATOR_VERSION
            described.append(entry)
    else:
        own = getattr(dataset, "fingerprint", None)
        described.append({"label": type(dataset).__name__, "kind": type(dataset).__qualname__,
                          "samples": len(dataset), "items": own() if callable(own) else None})
    return {
        "sources": described,
        "samples": len(dataset),
        "preprocess": fingerprint() if callable(fingerprint) else None,
    }


class Indexed(Dataset):
    """dataset[i] -> (i, item): the data set index travels with each item through the loader."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return index, self.dataset[index]


class AlignedBatches(Sampler):
    """Batches [k*B, (k+1)*B) of a data set of `total` samples, from the one holding `start`."""

    def __init__(self, total: int, batch_size: int, start: int = 0):
        self.total, self.batch_size = int(total), int(batch_size)
        self.first = int(start) // self.batch_size

    def __len__(self) -> int:
        return max(0, math.ceil(self.total / self.batch_size) - self.first)

    def __iter__(self):
        for k in range(self.first, self.first + len(self)):
            yield list(range(k * self.batch_size, min(self.total, (k + 1) * self.batch_size)))


@dataclass
class CaptureBatch:
    images: Optional[torch.Tensor]  # (B, 3, S, S), None when every sample was skipped
    indices: List[int] = field(default_factory=list)
    keys: List[str] = field(default_factory=list)
    sources: List[str] = field(default_factory=list)
    files: List[str] = field(default_factory=list)
    skipped: List[SkippedSample] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.indices)

    def pin_memory(self) -> "CaptureBatch":
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


def collate(items) -> CaptureBatch:
    """`collate_fn` for Indexed datasets: good images stacked, skipped records set aside."""
    batch = CaptureBatch(images=None)
    images = []
    for index, item in items:
        if isinstance(item, SkippedSample):
            batch.skipped.append(item)
            continue
        image = item.image if isinstance(item.image, torch.Tensor) else torch.from_numpy(np.asarray(item.image))
        if image.dim() != 3 or not (image.dtype == torch.uint8 or image.is_floating_point()):
            raise CaptureError(
                f"sample {index} ({item.key}): expected a uint8 (3, S, S) image or a float one in [0, 1], got "
                f"{image.dtype} {tuple(image.shape)}"
            )
        if images and image.shape != images[0].shape:
            raise CaptureError(
                f"sample {index} ({item.key}) has an image of shape {tuple(image.shape)}, the batch's first "
                f"{tuple(images[0].shape)}: a capture needs one image size"
            )
        images.append(image)
        batch.indices.append(int(index))
        batch.keys.append(str(item.key))
        batch.sources.append(str(getattr(item, "source", "")))
        batch.files.append(str(getattr(item, "file", "")))
    if images:
        # numpy's stack, as the training collate does: torch.stack's thread pool costs more here
        batch.images = torch.from_numpy(np.stack([image.numpy() for image in images]))
    return batch
