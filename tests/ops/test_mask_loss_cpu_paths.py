"""The mask loss's two CPU code paths (AVX2 bodies and portable loops) against the float64 reference.

float32 logits with bool/uint8/float32 targets and no focal term take the AVX2 bodies where the
CPU has them; everything here runs once with them and once forced onto the portable loops. Mask
sizes are chosen around the 8- and 16-element steps, the row grouping of small masks and the
16,384-element chunks of large ones, so every tail and piece boundary is crossed.
"""

from __future__ import annotations

import pytest
import torch

import pyfast
from pyfast import _native
from pyfast.ops import reference

from conftest import assert_close

pytestmark = pytest.mark.skipif(not _native.native_available("cpu"), reason="needs pyfast's native CPU kernels")

NO_FOCAL_TERMS = {
    "bce+dice": dict(bce_weight=1.0, dice_weight=1.0),
    "bce": dict(bce_weight=1.0, dice_weight=0.0),
    "dice": dict(bce_weight=0.0, dice_weight=2.0, smooth=0.5),
}
TARGETS = {"bool": torch.bool, "uint8": torch.uint8, "float32": torch.float32}
# (N, M): below one vector, odd tails, many masks per piece, a mask cut into chunks with a tail.
SHAPES = [(3, 1), (5, 7), (4, 23), (33, 100), (64, 1024), (2, 3 * 16384 + 5)]


@pytest.fixture(params=["simd", "generic"])
def isa(request):
    _native._C._mask_loss_cpu_force_generic(request.param == "generic")
    yield request.param
    _native._C._mask_loss_cpu_force_generic(False)


def _inputs(n, m, target, seed, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, m, generator=g, dtype=torch.float64) * scale).float()
    soft = torch.rand(n, m, generator=g, dtype=torch.float64)
    targets = soft.float() if target == "float32" else (soft > 0.6).to(TARGETS[target])
    return logits, targets


def _loss_and_grad(fn, logits, targets, **kw):
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, targets, reduction="none", **kw)
    cot = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype)
    (loss * cot).sum().backward()
    return loss.detach(), x.grad


def _reference64(logits, targets, **kw):
    t = targets.double() if targets.is_floating_point() else targets
    return _loss_and_grad(reference.mask_loss_reference, logits.double(), t, **kw)


@pytest.mark.parametrize("terms", list(NO_FOCAL_TERMS))
@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_float64_reference(isa, shape, target, terms):
    logits, targets = _inputs(*shape, target, seed=10 * SHAPES.index(shape) + list(TARGETS).index(target))
    loss, grad = _loss_and_grad(pyfast.mask_loss, logits, targets, **NO_FOCAL_TERMS[terms])
    want_loss, want_grad = _reference64(logits, targets, **NO_FOCAL_TERMS[terms])
    assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert_close(grad, want_grad, rtol=1e-4, atol=1e-5 * want_grad.abs().max().item())


@pytest.mark.parametrize("target", list(TARGETS))
def test_saturated_and_huge_logits(isa, target):
    # Rows of 37 (a 16-step, a tail): saturated right/wrong, huge, tiny, exactly zero.
    values = torch.tensor([80.0, -80.0, 1e4, -1e4, 1e30, -1e30, 1e-30, 0.0, 88.0, -88.0, 87.5, -87.5, 3.0])
    logits = values[torch.arange(5 * 37) % len(values)].reshape(5, 37)
    targets = (torch.arange(5 * 37).reshape(5, 37) % 3 == 0).to(TARGETS[target])
    loss, grad = _loss_and_grad(pyfast.mask_loss, logits, targets)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    want_loss, want_grad = _reference64(logits, targets)
    assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert_close(grad, want_grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("position", [0, 9, 20])  # first vector, second vector, the 3-element tail
def test_nan_logit_poisons_only_its_mask(isa, position):
    logits, targets = _inputs(3, 23, "uint8", seed=7)
    logits[1, position] = float("nan")
    loss, grad = _loss_and_grad(pyfast.mask_loss, logits, targets)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    assert torch.isnan(grad[1]).all() and torch.isfinite(grad[[0, 2]]).all()


@pytest.mark.parametrize("value", [255.0, -0.5, 1.0000001])
@pytest.mark.parametrize("position", [0, 17, 36])
def test_float_targets_out_of_range_are_counted_in_every_lane(isa, position, value):
    logits, targets = _inputs(2, 37, "float32", seed=8)
    targets[1, position] = value
    with pytest.raises(ValueError, match=r"targets are float but outside \[0, 1\].* in 1 of 2 masks"):
        pyfast.mask_loss(logits, targets)


@pytest.mark.parametrize("position", [0, 17, 36])
def test_nan_float_target_poisons_its_mask_without_counting_as_out_of_range(isa, position):
    logits, targets = _inputs(3, 37, "float32", seed=11)
    targets[1, position] = float("nan")
    loss, grad = _loss_and_grad(pyfast.mask_loss, logits, targets)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    assert torch.isfinite(grad[[0, 2]]).all()


def test_paths_agree_closely_and_neither_depends_on_thread_count():
    logits, targets = _inputs(6, 40000, "uint8", seed=9)
    results = {}
    before = torch.get_num_threads()
    try:
        for generic in (False, True):
            _native._C._mask_loss_cpu_force_generic(generic)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                results[generic, threads] = _loss_and_grad(pyfast.mask_loss, logits, targets)
    finally:
        _native._C._mask_loss_cpu_force_generic(False)
        torch.set_num_threads(before)
    for generic in (False, True):
        for a, b in zip(results[generic, 1], results[generic, 2]):
            assert torch.equal(a, b)
    for a, b in zip(results[False, 1], results[True, 1]):
        assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())
