"""Fused mask loss vs what a user would write: BCE-with-logits + dice, eager and under torch.compile.

The peer is the loss as people write it (`F.binary_cross_entropy_with_logits` on the float mask plus
a sigmoid dice term, per mask, then the mean): impl "eager" runs it as is, "compile" under
`torch.compile`, the strongest thing a user has without pyfast. The targets come as uint8, bool or
float32; the peer converts them to the logits' dtype inside the (compiled) function, as users do.

Every case runs in two modes: "b2b" times calls back to back; "interleaved" runs a torch op (a head
layer's matmul) untimed before each timed call, the situation of a loss inside a training step,
where torch's own threads were just busy.

Targets (CPU, float32 logits, bce + dice, fwd+bwd at 64x256x256): >= 2x the compiled peer for every
target dtype, interleaved. GPU (bfloat16 logits): >= 80% of copy bandwidth, ahead of the compiled peer.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import pyfast

from conftest import measure, saved_tensor_bytes, torch_op

# (shape, target dtypes): the large case with binary masks only, to keep the run short.
CASES = [((64, 256, 256), ("uint8", "bool", "float32")), ((16, 1024, 1024), ("uint8",))]
IMPLS = ["fused", "eager", "compile"]
PHASES = ["forward", "backward", "full"]
MODES = ["b2b", "interleaved"]
TARGET_DTYPES = {"uint8": torch.uint8, "bool": torch.bool, "float32": torch.float32}


def bce_dice_peer(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """BCE-with-logits + dice per mask, averaged over masks: the same loss as
    `pyfast.mask_loss(logits, targets)` (bce_weight = dice_weight = 1), as a user writes it."""
    t = targets.to(logits.dtype).flatten(1)
    x = logits.flatten(1)
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none").mean(1)
    p = x.sigmoid()
    dice = 1 - (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)
    return (bce + dice).mean()


@functools.lru_cache(maxsize=None)
def _compiled():
    return torch.compile(bce_dice_peer, dynamic=False)


def _loss_fn(impl):
    return {"fused": pyfast.mask_loss, "eager": bce_dice_peer}.get(impl) or _compiled()


def _inputs(shape, target_dtype, device):
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    logits = (torch.randn(shape, generator=g) * 3).to(device, dtype)
    targets = (torch.rand(shape, generator=g) > 0.5).to(device, TARGET_DTYPES[target_dtype])
    return logits, targets


def _params():
    for shape, target_dtypes in CASES:
        for target_dtype in target_dtypes:
            yield pytest.param(shape, target_dtype, id=f"{'x'.join(map(str, shape))}-{target_dtype}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,target_dtype", list(_params()))
def test_mask_loss(benchmark, device, copy_bandwidth, shape, target_dtype, impl, phase, mode):
    slow = device.type == "cpu" and impl == "eager"
    if slow and (shape[1] >= 1024 or mode == "interleaved"):
        pytest.skip("the eager peer is an order of magnitude behind; measured back to back at the small size only")
    if impl == "compile" and phase == "backward":
        pytest.skip("a compiled backward donates its buffers: it cannot be rerun on one graph (see 'full')")
    logits, targets = _inputs(shape, target_dtype, device)
    logits.requires_grad_(phase != "forward")
    loss_fn = _loss_fn(impl)
    x_bytes, t_bytes = logits.numel() * logits.element_size(), targets.numel() * targets.element_size()
    if phase == "forward":
        fn = lambda: loss_fn(logits, targets)  # noqa: E731
        moved = x_bytes + t_bytes
    elif phase == "backward":
        loss = loss_fn(logits, targets)
        fn = lambda: torch.autograd.grad(loss, [logits], retain_graph=True)  # noqa: E731
        moved = 2 * x_bytes + t_bytes  # read logits, targets; write grad
    else:
        fn = lambda: torch.autograd.grad(loss_fn(logits, targets), [logits])  # noqa: E731
        moved = 3 * x_bytes + 2 * t_bytes
    extra = {}
    if phase == "full" and mode == "b2b":
        # What the loss holds between forward and backward, beyond its inputs.
        x = logits.detach().requires_grad_()
        extra["saved_MB"] = round(saved_tensor_bytes(lambda: loss_fn(x, targets), [x, targets]) / 2**20, 3)
    if copy_bandwidth and impl == "fused":
        extra["copy_GBps"] = round(copy_bandwidth, 1)
    case = f"{'x'.join(map(str, shape))} {str(logits.dtype)[6:]}/{target_dtype} {mode}"
    m = measure(benchmark, op="mask_loss", case=case, phase=phase, impl=impl, fn=fn, device=device,
                bytes_moved=moved, extra=extra, rounds=5 if slow else (30 if mode == "interleaved" else None),
                setup=torch_op(device) if mode == "interleaved" else None)
    if copy_bandwidth and impl == "fused" and m.gbps:
        m.extra["pct_of_copy"] = round(100 * m.gbps / copy_bandwidth, 1)
