"""Fused mask loss vs the eager reference vs torch.compile(reference): forward, backward, full.

Targets (issue): CPU float32 logits + uint8 targets, bce + dice, fwd+bwd at 64x256x256 and
16x1024x1024: >= 5x eager and >= 1.5x torch.compile (aim 2x), extra memory O(N) not O(N*H*W).
GPU (bfloat16 logits): >= 70% of copy bandwidth.
"""

from __future__ import annotations

import functools

import pytest
import torch

import pyfast
from pyfast.ops.reference import mask_loss_reference

from conftest import measure, saved_tensor_bytes

SHAPES = [(64, 256, 256), (16, 1024, 1024)]
IMPLS = ["fused", "eager", "compile"]
PHASES = ["forward", "backward", "full"]
TERMS = dict(bce_weight=1.0, dice_weight=1.0)  # bce + dice: the usual SAM-style mask loss


@functools.lru_cache(maxsize=None)
def _compiled():
    return torch.compile(mask_loss_reference, dynamic=False)


def _loss_fn(impl):
    if impl == "fused":
        return pyfast.mask_loss
    if impl == "eager":
        return mask_loss_reference
    return _compiled()


def _inputs(shape, device):
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    logits = (torch.randn(shape, generator=g) * 3).to(device, dtype)
    targets = (torch.rand(shape, generator=g) > 0.5).to(device, torch.uint8)
    return logits, targets


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_mask_loss(benchmark, device, copy_bandwidth, shape, impl, phase):
    logits, targets = _inputs(shape, device)
    logits.requires_grad_(phase != "forward")
    loss_fn = _loss_fn(impl)
    x_bytes, t_bytes = logits.numel() * logits.element_size(), targets.numel()
    if phase == "forward":
        fn = lambda: loss_fn(logits, targets, **TERMS)  # noqa: E731
        moved = x_bytes + t_bytes
    elif phase == "backward":
        loss = loss_fn(logits, targets, **TERMS)
        fn = lambda: torch.autograd.grad(loss, [logits], retain_graph=True)  # noqa: E731
        moved = 2 * x_bytes + t_bytes  # read logits, targets; write grad
    else:
        fn = lambda: torch.autograd.grad(loss_fn(logits, targets, **TERMS), [logits])  # noqa: E731
        moved = 3 * x_bytes + 2 * t_bytes
    extra = {}
    if phase == "full":
        # What the loss holds between forward and backward, beyond its inputs.
        x = logits.detach().requires_grad_()
        extra["saved_MB"] = round(saved_tensor_bytes(lambda: loss_fn(x, targets, **TERMS), [x, targets]) / 2**20, 3)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            fn()
            torch.cuda.synchronize(device)
            extra["peak_extra_MB"] = round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)
    if copy_bandwidth and impl == "fused":
        extra["copy_GBps"] = round(copy_bandwidth, 1)
    slow = device.type == "cpu" and impl == "eager" and shape[1] >= 1024
    m = measure(benchmark, op="mask_loss", case=f"{'x'.join(map(str, shape))} {logits.dtype}".replace("torch.", ""),
                phase=phase, impl=impl, fn=fn, device=device, bytes_moved=moved, extra=extra,
                rounds=5 if slow else None)
    if copy_bandwidth and impl == "fused" and m.gbps:
        m.extra["pct_of_copy"] = round(100 * m.gbps / copy_bandwidth, 1)
