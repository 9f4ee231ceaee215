"""pyfast.pack vs a plain cast, and a packed save vs torch.save of the float32 tensors.

Target (issue): packing 64 MB of float32 runs at >= 0.8x the speed of
`torch.empty(..., dtype=float16).copy_(x)`: the per-tensor statistics are nearly free.
Impls: "fused" = pyfast.pack (cast + statistics + policies), "eager" = the plain cast (no
statistics), "reference" = pack_reference (the pure-PyTorch twin with statistics),
"torch_save" = torch.save of the float32 tensors (phase "to_disk" only).
"""

from __future__ import annotations

import os

import pytest
import torch

import pyfast
from pyfast.ops.reference import pack_reference

from conftest import measure

MB = 1 << 20
# (case name, number of tensors, float32 bytes in total)
CASES = [("64MB-1-tensor", 1, 64 * MB), ("64MB-64-tensors", 64, 64 * MB), ("1MB-1-tensor", 1, MB)]


def make_inputs(count, total_bytes, device):
    g = torch.Generator().manual_seed(0)
    per = total_bytes // 4 // count
    return {f"t{i}": (torch.randn(per, generator=g) * 100).to(device) for i in range(count)}


def plain_cast(tensors, dtype):
    return {k: torch.empty(v.shape, dtype=dtype, device=v.device).copy_(v) for k, v in tensors.items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("impl", ["fused", "eager", "reference"])
@pytest.mark.parametrize("case,count,total", CASES, ids=[c[0] for c in CASES])
def test_pack(benchmark, device, case, count, total, impl, dtype):
    tensors = make_inputs(count, total, device)
    values = list(tensors.values())
    fn = {
        "fused": lambda: pyfast.pack(tensors, dtype=dtype),
        "eager": lambda: plain_cast(tensors, dtype),
        "reference": lambda: pack_reference(values, dtype=dtype, saturate=False),
    }[impl]
    measure(benchmark, op="pack", case=f"{case}-{str(dtype)[6:]}", phase="cast", impl=impl, fn=fn, device=device,
            bytes_moved=total + total // 2, rounds=15)


@pytest.mark.parametrize("impl", ["fused", "torch_save"])
@pytest.mark.parametrize("case,count,total", CASES[:2], ids=[c[0] for c in CASES[:2]])
def test_pack_to_disk(benchmark, device, tmp_path, case, count, total, impl):
    """pack + Packed.save (half the bytes, one writev) vs torch.save of the float32 tensors.
    Neither fsyncs here: this compares serialization + page-cache writes, not the disk."""
    tensors = make_inputs(count, total, device)
    path = os.path.join(tmp_path, "out")
    fn = {
        "fused": lambda: pyfast.pack(tensors).save(path, fsync=False),
        "torch_save": lambda: torch.save(tensors, path),
    }[impl]
    measure(benchmark, op="pack", case=case, phase="to_disk", impl=impl, fn=fn, device=device,
            bytes_moved=total, rounds=10)
