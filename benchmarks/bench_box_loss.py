"""Fused box loss vs the eager reference vs torch.compile(reference): forward, backward, full.

Targets: CPU float32 giou fwd+bwd: >= 10x eager and >= 2x compile at N=1M,
>= 3x eager at N=4096. GPU: >= 80% of copy bandwidth at N >= 4M, ahead of compile, 10x eager at 4096.
"""

from __future__ import annotations

import functools

import pytest
import torch

import pyfast
from pyfast.ops.reference import box_loss_reference

from conftest import measure

SIZES_CPU = [4096, 65536, 1 << 20]
SIZES_CUDA = [4096, 65536, 1 << 20, 1 << 22, 1 << 24]
IMPLS = ["fused", "eager", "compile"]
PHASES = ["forward", "backward", "full"]


def _sizes():
    return SIZES_CUDA if torch.cuda.is_available() else SIZES_CPU


def random_boxes(n, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 512
    wh = torch.rand(n, 2, generator=g) * 128 + 1
    target = torch.cat([xy, xy + wh], 1)
    pred = target + torch.randn(n, 4, generator=g) * 8
    return pred.to(device, dtype), target.to(device, dtype)


@functools.lru_cache(maxsize=None)
def _compiled():
    return torch.compile(box_loss_reference, dynamic=False)


def _loss_fn(impl):
    if impl == "fused":
        return pyfast.box_loss
    if impl == "eager":
        return box_loss_reference
    return _compiled()


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", _sizes())
def test_box_loss(benchmark, device, copy_bandwidth, n, impl, phase):
    if impl == "eager" and n > (1 << 22):
        pytest.skip("eager at this size only measures the allocator")
    pred, target = random_boxes(n, device)
    pred.requires_grad_(phase != "forward")
    loss_fn = _loss_fn(impl)
    elem = pred.element_size()
    box_bytes = n * 4 * elem
    if phase == "forward":
        fn = lambda: loss_fn(pred, target, mode="giou")  # noqa: E731
        moved = 2 * box_bytes
    elif phase == "backward":
        loss = loss_fn(pred, target, mode="giou")
        fn = lambda: torch.autograd.grad(loss, [pred], retain_graph=True)  # noqa: E731
        moved = 3 * box_bytes  # read pred, target; write grad
    else:
        fn = lambda: torch.autograd.grad(loss_fn(pred, target, mode="giou"), [pred])  # noqa: E731
        moved = 5 * box_bytes
    extra = {}
    if copy_bandwidth and impl == "fused":
        extra["copy_GBps"] = round(copy_bandwidth, 1)
    m = measure(benchmark, op="box_loss", case=f"giou f32 N={n}", phase=phase, impl=impl, fn=fn, device=device,
                bytes_moved=moved, extra=extra)
    if copy_bandwidth and impl == "fused" and m.gbps:
        m.extra["pct_of_copy"] = round(100 * m.gbps / copy_bandwidth, 1)
