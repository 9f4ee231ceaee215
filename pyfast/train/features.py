"""Features per batch: from the feature cache when it has them, else from the frozen backbone.

Freshly computed features are rounded through float16, the dtype the cache stores, before use:
a cold epoch (backbone) and a warm epoch (cache) feed the heads bit-identical features, so a run
is reproducible whether or not its cache was warm. The rounding is `pyfast.pack`, the cache's own
cast, so features beyond float16's range or non-finite raise a clear error, with or without a
cache, instead of reaching the heads as inf.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from pyfast.cache import FeatureCache, make_fingerprint, pack

STORE_DTYPE = torch.float16


def feature_fingerprint(backbone: nn.Module, preprocess: dict, image_size: int, precision: str) -> str:
    return make_fingerprint(
        backbone,
        {"preprocess": preprocess, "image_size": image_size, "store_dtype": STORE_DTYPE, "backbone_precision": precision},
    )


class FeatureProvider:
    """`provider(batch) -> (B, C, h, w) float32` on `device`, in batch order.

    cache: a FeatureCache or None (then every batch runs the backbone, still rounded to fp16).
    autocast: a zero-argument callable returning the autocast context for the backbone.
    """

    def __init__(self, backbone: nn.Module, cache: FeatureCache | None, device: torch.device, autocast=None):
        self.backbone = backbone
        self.cache = cache
        self.device = device
        self.autocast = autocast or contextlib.nullcontext
        self.computed = 0  # images that went through the backbone

    @torch.no_grad()
    def _compute(self, images: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            out = self.backbone(images.to(self.device, non_blocking=True))
        return pack({"features": out}, dtype=STORE_DTYPE).unpack()["features"]

    def __call__(self, batch) -> torch.Tensor:
        keys = batch.keys
        if self.cache is None:
            return self._compute(batch.images).float()
        found: list[torch.Tensor | None] = []
        for key in keys:
            entry = self.cache.get(key, device=self.device)
            found.append(entry["features"] if entry is not None else None)
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            fresh = self._compute(batch.images[missing])
            self.computed += len(missing)
            for j, i in enumerate(missing):
                self.cache.put(keys[i], {"features": fresh[j]})
                found[i] = fresh[j]
        return torch.stack(found).to(self.device).float()
