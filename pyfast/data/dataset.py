"""The robust dataset over many sources, and the collate function that separates skipped samples."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .sample import BadSample, Sample, SkippedSample
from .source import Source


class RobustDataset(Dataset):
    """The concatenation of `sources`. `__getitem__` returns the (optionally preprocessed) sample, or
    a SkippedSample record when it fails to load, validate or preprocess.

    It never raises for a bad sample and never substitutes another index (retrying idx+1 double-samples
    its neighbour and can loop forever): the caller counts the record and moves on.
    """

    def __init__(self, sources: Sequence[Source], *, preprocess: Optional[Callable[[Sample], object]] = None):
        self.sources = list(sources)
        # offsets[s] is the first global index of source s; searchsorted maps back in O(log n).
        self.offsets = np.zeros(len(self.sources) + 1, dtype=np.int64)
        np.cumsum([len(source) for source in self.sources], out=self.offsets[1:])
        self.preprocess = preprocess

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _normalize(self, index: int) -> int:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        return index

    def locate(self, index: int):
        """Global index -> (source, local index)."""
        index = self._normalize(index)
        position = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.sources[position], index - int(self.offsets[position])

    def __getitem__(self, index: int):
        global_index = self._normalize(index)
        source, local = self.locate(global_index)
        try:
            sample = source.load(local)
            return self.preprocess(sample) if self.preprocess is not None else sample
        except BadSample as error:
            return SkippedSample(
                source=source.name,
                file=source.describe(local),
                reason=error.reason,
                index=global_index,
                category=error.category,
            )


def _as_tensor(array) -> torch.Tensor:
    return array if isinstance(array, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(array))


@dataclass
class Batch:
    """A collated batch of good samples plus the records of the ones that were skipped.

    images: float (B, 3, S, S) when every sample was preprocessed to the same size; otherwise a list
        of per-sample tensors (uint8 (H, W, 3) for raw samples); None when the batch has no good sample.
    boxes, prompt_boxes: lists of float32 (K_i, 4); masks: list of bool (K_i, H, W).
    """

    images: Union[torch.Tensor, List[torch.Tensor], None]
    boxes: List[torch.Tensor] = field(default_factory=list)
    prompt_boxes: List[torch.Tensor] = field(default_factory=list)
    masks: List[torch.Tensor] = field(default_factory=list)
    keys: List[str] = field(default_factory=list)
    sources: List[str] = field(default_factory=list)
    files: List[str] = field(default_factory=list)
    skipped: List[SkippedSample] = field(default_factory=list)

    def __len__(self) -> int:
        """The number of good samples (0 is possible: every sample in it may have been skipped)."""
        return len(self.keys)

    def _map_tensors(self, fn) -> "Batch":
        images = self.images
        if isinstance(images, torch.Tensor):
            images = fn(images)
        elif isinstance(images, list):
            images = [fn(image) for image in images]
        return Batch(
            images=images,
            boxes=[fn(t) for t in self.boxes],
            prompt_boxes=[fn(t) for t in self.prompt_boxes],
            masks=[fn(t) for t in self.masks],
            keys=self.keys,
            sources=self.sources,
            files=self.files,
            skipped=self.skipped,
        )

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True)."""
        return self._map_tensors(lambda t: t.pin_memory())

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))


def _stack_images(images: List[torch.Tensor]) -> torch.Tensor:
    # numpy's copy is single-threaded; torch.stack fans out to the intra-op pool, and with
    # workers=0 on a busy machine its OpenMP barriers cost more than the copy (~200 ms a batch
    # measured on 2 oversubscribed cores, against ~1 ms here).
    if all(image.device.type == "cpu" for image in images):
        return torch.from_numpy(np.stack([image.numpy() for image in images]))
    return torch.stack(images)


def collate(batch: Sequence[object]) -> Batch:
    """`collate_fn` for RobustDataset: good samples become tensors, SkippedSample records are kept aside."""
    skipped = [item for item in batch if isinstance(item, SkippedSample)]
    good = [item for item in batch if not isinstance(item, SkippedSample)]
    images = [_as_tensor(sample.image) for sample in good]
    stackable = (
        images
        and all(image.is_floating_point() and image.dim() == 3 for image in images)
        and len({tuple(image.shape) for image in images}) == 1
    )
    return Batch(
        images=_stack_images(images) if stackable else (images or None),
        boxes=[_as_tensor(sample.boxes) for sample in good],
        prompt_boxes=[_as_tensor(sample.prompt_boxes) for sample in good],
        masks=[_as_tensor(sample.masks) for sample in good],
        keys=[sample.key for sample in good],
        sources=[sample.source for sample in good],
        files=[sample.file for sample in good],
        skipped=skipped,
    )
