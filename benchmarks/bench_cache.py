"""FeatureCache: warm reads (page cache) with and without verification, and puts.

Target (issue): warm reads within 2x of reading the same bytes with numpy from the page cache.
Impls for phase "get": "fused" = cache.get (checksum verified), "noverify" = verify=False,
"eager" = np.fromfile of the same entry files (raw bytes, no parsing, no checks).
Phase "put": "fused" = cache.put (pack + checksum + atomic write with fsync), "nofsync" = the
same without fsync, "eager" = torch.save of the float32 tensors to the same folder.
GB/s counts the entry bytes (float16 payload + header) per second.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import pyfast

from conftest import measure

KB = 1 << 10
# (case, channels, side): entries of about 128 KB and 1 MB in float16, 64 MB of entries per round.
CASES = [("128KB-entries", 64, 32), ("1MB-entries", 128, 64)]
TOTAL = 64 << 20


def entry_features(channels, side, i):
    g = torch.Generator().manual_seed(i)
    return {"features": torch.randn(channels, side, side, generator=g)}


def filled_cache(root, channels, side, **kwargs):
    cache = pyfast.FeatureCache(root, "bench", **kwargs)
    count = TOTAL // (channels * side * side * 2)
    keys = [f"images/{i:06d}.jpg|size=1|mtime_ns=1" for i in range(count)]
    for i, key in enumerate(keys):
        cache.put(key, entry_features(channels, side, i))
    return cache, keys


@pytest.mark.parametrize("impl", ["fused", "noverify", "eager"])
@pytest.mark.parametrize("case,channels,side", CASES, ids=[c[0] for c in CASES])
def test_get(benchmark, tmp_path, case, channels, side, impl):
    cache, keys = filled_cache(tmp_path, channels, side, fsync=False)
    cache.verify = impl != "noverify"
    paths = [cache.path(k) for k in keys]
    total = sum(os.path.getsize(p) for p in paths)
    if impl == "eager":
        fn = lambda: [np.fromfile(p, dtype=np.uint8) for p in paths]  # noqa: E731
    else:
        fn = lambda: [cache.get(k) for k in keys]  # noqa: E731
    measure(benchmark, op="cache", case=case, phase="get", impl=impl, fn=fn, device=torch.device("cpu"),
            bytes_moved=total, rounds=10, extra={"entries": len(keys)})
    assert cache.stats.corrupt == 0 and (impl == "eager" or cache.stats.misses == 0)


@pytest.mark.parametrize("impl", ["fused", "nofsync", "eager"])
@pytest.mark.parametrize("case,channels,side", CASES, ids=[c[0] for c in CASES])
def test_put(benchmark, tmp_path, case, channels, side, impl):
    cache = pyfast.FeatureCache(tmp_path, "bench", fsync=impl != "nofsync")
    count = TOTAL // (channels * side * side * 2) // 4  # 16 MB per round: fsync costs real time
    items = [(f"images/{i:06d}.jpg", entry_features(channels, side, i)) for i in range(count)]
    entry_bytes = cache.put(*items[0])
    if impl == "eager":
        fn = lambda: [torch.save(t, os.path.join(tmp_path, f"{i}.pt")) for i, (_k, t) in enumerate(items)]  # noqa: E731
    else:
        fn = lambda: [cache.put(k, t) for k, t in items]  # noqa: E731
    measure(benchmark, op="cache", case=case, phase="put", impl=impl, fn=fn, device=torch.device("cpu"),
            bytes_moved=entry_bytes * count, rounds=5, extra={"entries": count})
