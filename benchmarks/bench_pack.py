"""pyfast.pack vs the casts a user would write, and a packed save vs torch.save of the float32 tensors.

Impls of phase "cast": "fused" = `pyfast.pack` into a new buffer (cast + per-tensor statistics +
policies), "eager" = a plain `t.to(dtype)` per tensor (no statistics), "fused_out" = `pyfast.pack`
with `out=` a Packed from an earlier call, "copy_into" = `buf.copy_(t)` into preallocated buffers,
the peer of `out=`. Phase "to_disk": "fused" = pack + `Packed.save`, "torch_save" = torch.save of
the float32 tensors. Each cast case runs back to back ("b2b") and with a torch op run untimed before
every timed call ("interleaved"), as in a training or caching loop.

Targets: pack >= 0.8x the speed of `.to(float16)` at 64 MB; `out=` close to `copy_` into a buffer.
"""

from __future__ import annotations

import os

import pytest
import torch

import pyfast

from conftest import measure, torch_op

MB = 1 << 20
# (case name, number of tensors, float32 bytes in total, 16-bit dtypes)
CASES = [
    ("64MB-1-tensor", 1, 64 * MB, (torch.float16, torch.bfloat16)),
    ("64MB-64-tensors", 64, 64 * MB, (torch.float16,)),
    ("1MB-1-tensor", 1, MB, (torch.float16,)),
]
IMPLS = ["fused", "eager", "fused_out", "copy_into"]
MODES = ["b2b", "interleaved"]


def make_inputs(count, total_bytes, device):
    g = torch.Generator().manual_seed(0)
    per = total_bytes // 4 // count
    return {f"t{i}": (torch.randn(per, generator=g) * 100).to(device) for i in range(count)}


def _cast_fn(impl, tensors, dtype):
    if impl == "fused":
        return lambda: pyfast.pack(tensors, dtype=dtype)
    if impl == "eager":
        return lambda: {k: v.to(dtype) for k, v in tensors.items()}
    if impl == "fused_out":
        reused = pyfast.pack(tensors, dtype=dtype)
        return lambda: pyfast.pack(tensors, dtype=dtype, out=reused)
    buffers = {k: torch.empty_like(v, dtype=dtype) for k, v in tensors.items()}
    return lambda: [buffers[k].copy_(v) for k, v in tensors.items()]


def _params():
    for case, count, total, dtypes in CASES:
        for dtype in dtypes:
            yield pytest.param(case, count, total, dtype, id=f"{case}-{str(dtype)[6:]}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case,count,total,dtype", list(_params()))
def test_pack(benchmark, device, case, count, total, dtype, impl, mode):
    tensors = make_inputs(count, total, device)
    measure(benchmark, op="pack", case=f"{case}-{str(dtype)[6:]} {mode}", phase="cast", impl=impl,
            fn=_cast_fn(impl, tensors, dtype), device=device, bytes_moved=total + total // 2, rounds=15,
            setup=torch_op(device) if mode == "interleaved" else None)


@pytest.mark.parametrize("impl", ["fused", "torch_save"])
@pytest.mark.parametrize("case,count,total", [c[:3] for c in CASES[:2]], ids=[c[0] for c in CASES[:2]])
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
