"""The robust dataset over many sources, and the collate function that builds flat batches.

With a feature-cache lookup (`RobustDataset(..., features=lookup)`), a sample whose features are
cached is served from the cache where the dataset runs (inside the DataLoader workers when there
are any) without its image being decoded: the item carries the cached maps instead of an image, and
only the misses carry an image for the backbone in the main process. Every item records the
lookup's outcome, and `collate` sums them, so the workers' cache hits, misses and corrupt entries
reach the main process with the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from .sample import BadSample, Sample, SkippedSample
from .source import Source
from .transforms import LetterboxedSample


class FeatureLookup(Protocol):
    """What the dataset asks a feature cache: the maps stored for `key` (name -> tensor) or None,
    and the outcome, "hit", "miss" or "corrupt" (a damaged or mismatched entry, dropped)."""

    def get(self, key: str) -> Tuple[Optional[Dict[str, torch.Tensor]], str]: ...


class _Lookup:
    """The `skip_image` callback of one `__getitem__`: looks the key up and keeps what it found."""

    __slots__ = ("features", "found", "outcome")

    def __init__(self, features: FeatureLookup):
        self.features = features
        self.found: Optional[Dict[str, torch.Tensor]] = None
        self.outcome: Optional[str] = None

    def __call__(self, key: str) -> bool:
        self.found, self.outcome = self.features.get(key)
        return self.found is not None


class RobustDataset(Dataset):
    """The concatenation of `sources`. `__getitem__` returns the (optionally preprocessed) sample, or
    a SkippedSample record when it fails to load, validate or preprocess.

    It never raises for a bad sample and never substitutes another index (retrying idx+1 double-samples
    its neighbour and can loop forever): the caller counts the record and moves on.

    features: a FeatureLookup (needs `preprocess`). A hit returns the sample's targets with the cached
    maps in `features` and no image; sources that can (`Source.loads_without_image`) never decode it.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        *,
        preprocess: Optional[Callable[[Sample], object]] = None,
        features: Optional[FeatureLookup] = None,
    ):
        if features is not None and preprocess is None:
            raise ValueError("a feature lookup needs a preprocess (e.g. Letterbox) to bring the targets to the features' size")
        self.sources = list(sources)
        # offsets[s] is the first global index of source s; searchsorted maps back in O(log n).
        self.offsets = np.zeros(len(self.sources) + 1, dtype=np.int64)
        np.cumsum([len(source) for source in self.sources], out=self.offsets[1:])
        self.preprocess = preprocess
        self.features = features

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
        lookup = _Lookup(self.features) if self.features is not None else None
        try:
            if lookup is not None and source.loads_without_image:
                sample = source.load(local, skip_image=lookup)
            else:
                sample = source.load(local)
                if lookup is not None:
                    lookup(sample.key)  # a source that knows its key only once loaded: the backbone is still spared
            if lookup is not None and lookup.found is not None:
                sample.image = None
            if self.preprocess is None:
                return sample
            item = self.preprocess(sample)
        except BadSample as error:
            return SkippedSample(
                source=source.name,
                file=source.describe(local),
                reason=error.reason,
                index=global_index,
                category=error.category,
            )
        item.index = global_index
        if lookup is not None:
            item.features, item.cache = lookup.found, lookup.outcome
        return item


@dataclass
class Batch:
    """A collated batch: flat tensors over its good samples and their boxes, plus bookkeeping.

    Per good sample (B of them, in batch order): `keys`, `sources`, `files`, and `indices` (B,) int64,
    the global dataset indices.
    Per box (N over the batch, grouped by sample): `prompt_boxes`, `boxes` float32 (N, 4) xyxy,
    `masks` bool (N, S, S), `box_sample` int64 (N,), the row in 0..B-1 of the box's sample.
    Features: `cached` name -> float16 (H, C, h, w) for the H samples served from the feature cache,
    at rows `cached_rows` (H,); `images` uint8 (M, 3, S, S) for the M samples whose features must be
    computed, at rows `image_rows` (M,). Either may be empty (None / length 0).
    `skipped`: the SkippedSample records; `cache_hits`, `cache_misses`, `cache_corrupt`: this batch's
    feature-cache lookups (made where the dataset ran, in a worker or not).
    """

    keys: List[str] = field(default_factory=list)
    sources: List[str] = field(default_factory=list)
    files: List[str] = field(default_factory=list)
    indices: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    prompt_boxes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 4))
    boxes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 4))
    masks: Optional[torch.Tensor] = None
    box_sample: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    cached: Dict[str, torch.Tensor] = field(default_factory=dict)
    cached_rows: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    images: Optional[torch.Tensor] = None
    image_rows: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    skipped: List[SkippedSample] = field(default_factory=list)
    cache_hits: int = 0
    cache_misses: int = 0
    cache_corrupt: int = 0

    def __len__(self) -> int:
        """The number of good samples (0 is possible: every sample in it may have been skipped)."""
        return len(self.keys)

    @property
    def num_boxes(self) -> int:
        return int(self.boxes.shape[0])

    def describe(self, limit: int = 8) -> str:
        """`source: file` of the batch's samples, the first `limit` of them."""
        named = [f"{source}: {file}" for source, file in zip(self.sources, self.files)]
        more = f" and {len(named) - limit} more" if len(named) > limit else ""
        return ", ".join(named[:limit]) + more

    def _map_tensors(self, fn) -> "Batch":
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                changes[f.name] = fn(value)
            elif f.name == "cached":
                changes[f.name] = {name: fn(t) for name, t in value.items()}
        return Batch(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True): every tensor lands in page-locked memory, so the
        host-to-device copies that follow are asynchronous."""
        return self._map_tensors(lambda t: t.pin_memory())

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))


def _empty(shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; in a DataLoader worker, in shared memory, so that sending it to the
    main process costs no copy (what torch's default_collate does)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    storage = torch.UntypedStorage._new_shared(max(1, math.prod(shape)) * itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def _concat(tensors: List[torch.Tensor], shape_tail: Tuple[int, ...], dtype: torch.dtype, stack: bool = False) -> torch.Tensor:
    """numpy's single-threaded copy into one output: torch.cat/stack fan out to the intra-op pool,
    whose barriers cost more than the copy on a busy machine with workers=0."""
    rows = len(tensors) if stack else sum(int(t.shape[0]) for t in tensors)
    out = _empty((rows, *shape_tail), dtype)
    if rows:
        arrays = [t.numpy() for t in tensors]
        (np.stack if stack else np.concatenate)(arrays, out=out.numpy())
    return out


def collate(items: Sequence[object]) -> Batch:
    """`collate_fn` for a RobustDataset with a preprocess: good samples become flat tensors (see
    Batch), SkippedSample records are kept aside, cache-lookup outcomes are counted."""
    skipped = [item for item in items if isinstance(item, SkippedSample)]
    good = [item for item in items if not isinstance(item, SkippedSample)]
    if any(not isinstance(item, LetterboxedSample) for item in good):
        kinds = sorted({type(item).__name__ for item in good if not isinstance(item, LetterboxedSample)})
        raise TypeError(f"collate needs samples preprocessed to one size (e.g. by Letterbox), got {', '.join(kinds)}")
    sizes = {tuple(item.masks.shape[1:]) for item in good}
    if len(sizes) > 1:
        raise ValueError(f"collate needs samples of one size, got {sorted(sizes)}")
    batch = Batch(skipped=skipped)
    if not good:
        return batch
    (size,) = sizes
    counts = torch.tensor([item.num_objects for item in good], dtype=torch.int64)
    hit_rows = [i for i, item in enumerate(good) if item.features is not None]
    image_rows = [i for i, item in enumerate(good) if item.image is not None]
    outcomes = [item.cache for item in good]

    batch.keys = [item.key for item in good]
    batch.sources = [item.source for item in good]
    batch.files = [item.file for item in good]
    batch.indices = torch.tensor([item.index for item in good], dtype=torch.int64)
    batch.prompt_boxes = _concat([item.prompt_boxes for item in good], (4,), torch.float32)
    batch.boxes = _concat([item.boxes for item in good], (4,), torch.float32)
    batch.masks = _concat([item.masks for item in good], size, torch.bool)
    batch.box_sample = torch.repeat_interleave(torch.arange(len(good)), counts)
    if hit_rows:
        first = good[hit_rows[0]].features
        batch.cached = {
            name: _concat([good[i].features[name] for i in hit_rows], tuple(t.shape), t.dtype, stack=True)
            for name, t in first.items()
        }
        batch.cached_rows = torch.tensor(hit_rows, dtype=torch.int64)
    if image_rows:
        image = good[image_rows[0]].image
        batch.images = _concat([good[i].image for i in image_rows], tuple(image.shape), image.dtype, stack=True)
        batch.image_rows = torch.tensor(image_rows, dtype=torch.int64)
    batch.cache_hits = outcomes.count("hit")
    batch.cache_misses = outcomes.count("miss") + outcomes.count("corrupt")
    batch.cache_corrupt = outcomes.count("corrupt")
    return batch
