"""The CUDA mask loss beyond the per-device op suite: the fast element math of 16-bit logits
against its stated error bound, and masks of every size (one warp per mask up to 4096 elements,
eight to a block; block partials and a per-mask warp pass beyond).
"""

from __future__ import annotations

import pytest
import torch

import pyfast
from pyfast.ops import reference

from conftest import assert_close, requires_cuda

pytestmark = requires_cuda

HALF_TYPES = [torch.float16, torch.bfloat16]

# The bound of csrc/mask_loss/mask_loss_fast_math.cuh for a one-element mask (bce + dice):
# |loss - float64 reference| <= ELEMENT_ATOL + ELEMENT_RTOL * |reference|.
ELEMENT_ATOL, ELEMENT_RTOL = 2e-6, 1e-6


def _every_finite(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of a 16-bit dtype: zeros, subnormals, and the saturated ends (+-65504
    for float16, +-3.4e38 for bfloat16)."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    return x[torch.isfinite(x.float())]


def _targets(kind: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "soft":
        return torch.rand(n, generator=g)  # float32 targets, allowed with 16-bit logits
    return torch.full((n,), kind == "ones", dtype=torch.bool)


def _reference_targets(t: torch.Tensor) -> torch.Tensor:
    return t.double() if t.is_floating_point() else t


@pytest.mark.parametrize("kind", ["zeros", "ones", "soft"])
@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_fast_element_math_within_its_bound_on_every_finite_logit(dtype, kind):
    x = _every_finite(dtype)
    if kind == "soft":
        # The bound is the element math's; with soft targets the float32 product x * t (the same
        # in the accurate path) adds 2^-24 |x t|, which stays inside it for |x| <= 16.
        x = x[x.float().abs() <= 16]
    logits = x.view(-1, 1)
    targets = _targets(kind, x.numel(), seed=1).view(-1, 1)
    got = pyfast.mask_loss(logits.cuda(), targets.cuda(), reduction="none").cpu().double()
    want = reference.mask_loss_reference(logits.double(), _reference_targets(targets), reduction="none")
    err = (got - want).abs()
    excess = err - (ELEMENT_ATOL + ELEMENT_RTOL * want.abs())
    worst = int(excess.argmax())
    assert excess[worst] <= 0, (
        f"logit {logits[worst].item()!r}, target {targets[worst].item()}: {got[worst].item()!r} vs "
        f"{want[worst].item()!r} (error {err[worst].item():.3g})"
    )


@pytest.mark.parametrize("kind", ["zeros", "soft"])
@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_fast_element_gradient_within_the_bound_and_the_output_rounding(dtype, kind):
    # The gradient is stored in the logits' dtype: the fast math's error (<= 4e-6 absolute on these
    # O(1) terms) plus one rounding step of the dtype.
    x = _every_finite(dtype)
    logits = x.view(-1, 1).cuda().requires_grad_()
    targets = _targets(kind, x.numel(), seed=2).view(-1, 1)
    pyfast.mask_loss(logits, targets.cuda(), reduction="sum").backward()
    ref = logits.detach().cpu().double().requires_grad_()
    reference.mask_loss_reference(ref, _reference_targets(targets), reduction="sum").backward()
    got, want = logits.grad.cpu().double(), ref.grad
    eps = torch.finfo(dtype).eps
    excess = (got - want).abs() - (4e-6 + eps * want.abs())
    worst = int(excess.argmax())
    assert excess[worst] <= 0, f"logit {x[worst].item()!r}: {got[worst].item()!r} vs {want[worst].item()!r}"


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_fresh_random_and_saturated_masks_with_every_term(dtype):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 777, generator=g, dtype=torch.float64) * 4
    logits[::3, ::5] = 60000.0 if dtype == torch.float16 else 1e30  # saturated both ways
    logits[1::3, ::7] = -60000.0 if dtype == torch.float16 else -1e30
    logits = logits.to(dtype)
    targets = torch.rand(64, 777, generator=g) > 0.5
    for terms in (dict(), dict(focal_weight=1.0), dict(focal_weight=0.5, gamma=1.5, alpha=-1.0)):
        got = pyfast.mask_loss(logits.cuda(), targets.cuda(), reduction="none", **terms)
        want = reference.mask_loss_reference(logits.double(), targets, reduction="none", **terms)
        assert_close(got, want, rtol=1e-5, atol=1e-6)


# (n, m): m % 8 != 0, the warp path's edges (1, 4096), the block path with a ragged last chunk.
SHAPES = [(5, 1), (9, 3 * 5), (1000, 28 * 28), (17, 33), (300, 4095), (40, 4096), (7, 4097), (3, 3 * 8192 + 5)]


@pytest.mark.parametrize("n,m", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_masks_of_every_size_match_reference(dtype, n, m):
    g = torch.Generator().manual_seed(n * 7919 + m)
    logits = (torch.randn(n, m, generator=g, dtype=torch.float64) * 3).to(dtype)
    targets = torch.rand(n, m, generator=g) > 0.6
    x = logits.cuda().requires_grad_()
    loss = pyfast.mask_loss(x, targets.cuda(), reduction="none", focal_weight=1.0)
    loss.sum().backward()
    ref = logits.double().requires_grad_()
    want = reference.mask_loss_reference(ref, targets, reduction="none", focal_weight=1.0)
    want.sum().backward()
    assert_close(loss, want, rtol=1e-5, atol=1e-6)
    tol = 1e-4 if dtype == torch.float32 else torch.finfo(dtype).eps
    assert_close(x.grad, ref.grad, rtol=tol, atol=tol * ref.grad.abs().max().item())
    iou = pyfast.mask_iou(logits.cuda(), targets.cuda(), 0.2)
    assert_close(iou, reference.mask_iou_reference(logits, targets, 0.2), rtol=1e-6, atol=0)


@pytest.mark.parametrize("m", [1, 28 * 28, 4096, 4097, 3 * 8192 + 5])
def test_a_mask_gives_the_same_bits_alone_and_among_others(m):
    # Eight masks share a block (up to 4096 elements) or a mask spreads over many blocks: neither
    # the neighbours nor the block schedule may change a mask's sums.
    g = torch.Generator().manual_seed(m)
    logits = (torch.randn(11, m, generator=g) * 3).half().cuda()
    targets = (torch.rand(11, m, generator=g) > 0.5).cuda()
    batch = pyfast.mask_loss(logits, targets, reduction="none")
    again = pyfast.mask_loss(logits, targets, reduction="none")
    assert torch.equal(batch, again)
    for i in (0, 5, 10):
        alone = pyfast.mask_loss(logits[i : i + 1].clone(), targets[i : i + 1].clone(), reduction="none")
        assert torch.equal(alone[0], batch[i])


def test_one_4096_squared_mask_among_small_ones():
    # The large mask's 2048 partials are added by one warp per mask; the small masks of the same
    # step go eight to a block.
    g = torch.Generator().manual_seed(5)
    big = (torch.randn(1, 4096 * 4096, generator=g) * 3).half()
    big_t = torch.rand(1, 4096 * 4096, generator=g) > 0.5
    small = (torch.randn(200, 56 * 56, generator=g) * 3).half()
    small_t = torch.rand(200, 56 * 56, generator=g) > 0.5
    for logits, targets in ((big, big_t), (small, small_t)):
        got = pyfast.mask_loss(logits.cuda(), targets.cuda(), reduction="none")
        want = reference.mask_loss_reference(logits.double(), targets, reduction="none")
        assert_close(got, want, rtol=1e-5, atol=1e-6)
    iou = pyfast.mask_iou(big.cuda(), big_t.cuda())
    assert_close(iou, reference.mask_iou_reference(big, big_t), rtol=1e-6, atol=0)
