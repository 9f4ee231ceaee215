"""The feature path: cached maps from the data pipeline, fresh maps from the frozen backbone.

Two halves. `CachedFeatures` runs where the dataset runs (inside the DataLoader workers when there
are any): it looks each sample's key up in the FeatureCache, and a hit is served without the image
ever being decoded. `FeatureProvider` runs in the main process on each collated batch: it uploads
the cached maps, runs the backbone on the misses only, stores their features, and returns the maps
the heads use as float32 on the device.

Fresh features are cast once per batch, into the cache's storage dtype (`pyfast.ops.pack.pack_buffers`,
the kernel behind `pyfast.pack`), in sample-major order so that each sample's slice of the buffer
is exactly its cache entry. The heads then read those rounded values, so a cold epoch (backbone)
and a warm epoch (cache) feed them bit-identical features and a run is reproducible whether or not
its cache was warm. Values beyond the storage dtype's range or non-finite raise an error naming the
map and the sample, with or without a cache, instead of reaching the heads as inf.

Host syncs on CUDA (none on CPU):
- a cold batch with a cache: one. The packed buffer and its statistics are copied to pinned host
  memory together and read once, to refuse bad values and to write the entries.
- a cold batch without a cache: none here. The statistics come back as `Features.check`, which the
  training step reads with its own single host read (validation reads it per batch).
- a warm batch: none. Cached maps come pinned from the DataLoader and are copied asynchronously.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from pyfast.cache import FeatureCache, Packed, TensorStats, make_fingerprint
from pyfast.data import Batch, images_to_device
from pyfast.models import FeatureMap, feature_maps
from pyfast.ops.pack import pack_buffers

log = logging.getLogger("pyfast.train")

STORE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class FeatureError(ValueError):
    """The backbone produced features that cannot be stored or used (non-finite, or beyond the
    storage dtype's range)."""


def feature_fingerprint(backbone: nn.Module, preprocess: dict, image_size: int, precision: str, store_dtype: torch.dtype) -> str:
    """What the cached features depend on: the backbone (class, weights and its own `preprocess`),
    the letterbox, the input size, the autocast precision and the storage dtype."""
    return make_fingerprint(
        backbone,
        {
            "preprocess": preprocess,
            "backbone_preprocess": getattr(backbone, "preprocess", None),
            "image_size": image_size,
            "store_dtype": store_dtype,
            "backbone_precision": precision,
        },
    )


class CachedFeatures:
    """The data pipeline's view of the cache (`pyfast.data.dataset.FeatureLookup`).

    `get(key)` returns (the maps the heads use, "hit") or (None, "miss" | "corrupt"). An entry whose
    maps do not have the probed shapes counts as corrupt and is replaced by the next put. Picklable:
    each DataLoader worker gets its own copy (and its own cache statistics, which is why outcomes
    travel with the batch).
    """

    def __init__(self, cache: FeatureCache, layout: dict[str, FeatureMap], use: list[str]):
        self.cache = cache
        self.shapes = {name: m.shape for name, m in layout.items()}
        self.use = list(use)

    def get(self, key: str):
        corrupt_before = self.cache.stats.corrupt
        entry = self.cache.get(key)
        if entry is None:
            return None, ("corrupt" if self.cache.stats.corrupt > corrupt_before else "miss")
        shapes = {name: tuple(t.shape) for name, t in entry.items()}
        if shapes != self.shapes:
            log.warning("pyfast cache: entry for %s holds maps %s, expected %s; recomputing it", key, shapes, self.shapes)
            return None, "corrupt"
        return {name: entry[name] for name in self.use}, "hit"


@dataclass
class Features:
    """The maps the heads use (float32 (B, C, h, w) on the device, in `use` order) and, for fresh
    features not checked yet, their pack statistics (int64 (n, 2) on the device: non-finite and
    out-of-range counts) for the caller's host read; see `FeatureProvider.raise_if_bad`."""

    maps: list[torch.Tensor]
    check: Optional[torch.Tensor] = None


class FeatureProvider:
    """`provider(batch) -> Features` for a collated Batch (see the module docstring).

    layout: every map the backbone returns (from `pyfast.models.probe`); use: the names of the maps
    the heads read; cache: a FeatureCache or None (features are still rounded to `store_dtype`);
    autocast: a zero-argument callable returning the autocast context for the backbone.
    """

    def __init__(
        self,
        backbone: nn.Module,
        layout: dict[str, FeatureMap],
        use: list[str],
        cache: FeatureCache | None,
        device: torch.device,
        autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
        store_dtype: torch.dtype = torch.float16,
    ):
        self.backbone = backbone
        self.layout = dict(layout)
        self.use = list(use)
        self.device = torch.device(device)
        self.autocast = autocast or contextlib.nullcontext
        self.store_dtype = store_dtype  # without a cache, the same rounding keeps runs comparable
        self.cache = cache
        self.names = list(self.layout)
        self.numels = [math.prod(m.shape) for m in self.layout.values()]
        self.offsets = [sum(self.numels[:i]) for i in range(len(self.numels))]
        self.per_sample = sum(self.numels)
        self.computed = 0  # samples that went through the backbone

    @property
    def cache(self) -> FeatureCache | None:
        return self._cache

    @cache.setter
    def cache(self, cache: FeatureCache | None) -> None:
        self._cache = cache
        if cache is not None:
            self.store_dtype = cache.dtype  # the cache decides how features are stored

    # ---- fresh features

    @torch.no_grad()
    def compute(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The backbone's maps for uint8 (M, 3, S, S) images (any device), checked against the probed layout."""
        x = images_to_device(images, self.device)
        with self.autocast():
            maps = feature_maps(self.backbone(x))
        shapes = {name: tuple(t.shape[1:]) for name, t in maps.items()}
        expected = {name: m.shape for name, m in self.layout.items()}
        if shapes != expected or any(t.shape[0] != x.shape[0] for t in maps.values()):
            raise FeatureError(f"backbone returned maps {shapes} for a batch of {x.shape[0]}, probed {expected}")
        return maps

    def _pack(self, maps: dict[str, torch.Tensor]):
        """One cast of every map of every sample into one (M, per_sample) buffer, sample-major; no sync."""
        m = next(iter(maps.values())).shape[0]
        tensors = [maps[name][i] for i in range(m) for name in self.names]
        buffer, counts, absmax = pack_buffers(tensors, self.store_dtype, saturate=True)
        return buffer.view(m, self.per_sample), counts, absmax

    def _views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        m = buffer.shape[0]
        return {
            name: buffer[:, off : off + n].view(m, *self.layout[name].shape)
            for name, off, n in zip(self.names, self.offsets, self.numels)
        }

    def raise_if_bad(self, counts, batch: Batch, rows) -> None:
        """Raises FeatureError when the pack statistics `counts` (host values, (M * maps, 2)) of the
        samples at `rows` of `batch` show a non-finite or out-of-range value, naming map and sample."""
        counts = torch.as_tensor(counts).reshape(-1, len(self.names), 2)
        bad = (counts > 0).nonzero().tolist()
        if not bad:
            return
        sample, map_index, column = bad[0]
        row = int(rows[sample])
        what = "non-finite" if column == 0 else f"beyond the {self.store_dtype} range ±{torch.finfo(self.store_dtype).max:g}"
        hint = "" if column == 0 else " (store features as bf16: --cache-dtype bf16)"
        more = f"; {len(bad) - 1} more map(s) or sample(s) of the batch too" if len(bad) > 1 else ""
        raise FeatureError(
            f"backbone output {self.names[map_index]!r} of {batch.sources[row]}: {batch.files[row]} has "
            f"{int(counts[sample, map_index, column])} values {what}{more}{hint}"
        )

    def _store(self, batch: Batch, buffer: torch.Tensor, counts: torch.Tensor, absmax: torch.Tensor) -> None:
        """The cold batch's one host read: buffer and statistics to pinned memory, one sync; then checks and puts."""
        if buffer.device.type == "cuda":
            host = torch.empty(buffer.shape, dtype=buffer.dtype, pin_memory=True)
            host_counts = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
            host_absmax = torch.empty(absmax.shape, dtype=absmax.dtype, pin_memory=True)
            host.copy_(buffer, non_blocking=True)
            host_counts.copy_(counts, non_blocking=True)
            host_absmax.copy_(absmax, non_blocking=True)
            torch.cuda.current_stream(buffer.device).synchronize()  # the one host sync of a cold batch
        else:
            host, host_counts, host_absmax = buffer, counts, absmax
        rows = batch.image_rows.tolist()
        self.raise_if_bad(host_counts, batch, rows)
        entries = {name: (off, self.layout[name].shape) for name, off in zip(self.names, self.offsets)}
        absmax_values = host_absmax.reshape(-1, len(self.names)).tolist()
        for i, row in enumerate(rows):
            stats = {name: TensorStats(0, 0, float(a)) for name, a in zip(self.names, absmax_values[i])}
            self.cache.put(batch.keys[row], Packed(host[i], entries, stats=stats))

    # ---- the batch

    def __call__(self, batch: Batch) -> Features:
        size = len(batch)
        fresh, check = None, None
        if batch.images is not None and batch.images.shape[0]:
            buffer, counts, absmax = self._pack(self.compute(batch.images))
            self.computed += buffer.shape[0]
            if self.cache is not None:
                self._store(batch, buffer, counts, absmax)
            else:
                check = counts
            fresh = self._views(buffer)
        maps = []
        for name in self.use:
            cached = batch.cached.get(name)
            hit = cached.to(self.device, non_blocking=True) if cached is not None and cached.shape[0] else None
            new = fresh[name] if fresh is not None else None
            if new is None and hit is None:
                raise FeatureError(f"batch of {size} samples has neither cached nor fresh features for map {name!r}")
            if new is None:
                maps.append(hit.float())
            elif hit is None:
                maps.append(new.float())
            else:  # part of the batch was cached
                out = torch.empty((size, *self.layout[name].shape), dtype=torch.float32, device=self.device)
                out.index_copy_(0, batch.cached_rows.to(self.device, non_blocking=True), hit.float())
                out.index_copy_(0, batch.image_rows.to(self.device, non_blocking=True), new.float())
                maps.append(out)
        return Features(maps, check)
