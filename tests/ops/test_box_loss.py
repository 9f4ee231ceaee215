"""pyfast.box_loss / box_iou / BoxLoss against the float64 reference twin, on every test device."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import pyfast
from pyfast import _native
from pyfast.ops import reference
from pyfast.ops.box_loss import FORMATS, MODES

from backends import pyfast_env
from boxes import nasty_boxes, random_boxes
from conftest import assert_close, assert_second_backward_repeats

REDUCTIONS = ["none", "sum", "mean"]
OPTIONS = dict(mode="giou", box_format="xyxy", l1_weight=1.0, iou_weight=1.0, eps=1e-7)


def _to_cxcywh(b):
    return torch.cat([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], 1)


def _inputs(n, box_format, dtype=torch.float64, seed=0, device="cpu"):
    pred, target = random_boxes(n, generator=torch.Generator().manual_seed(seed))
    if box_format == "cxcywh":
        pred, target = _to_cxcywh(pred), _to_cxcywh(target)
    return pred.to(device, dtype), target.to(device, dtype)


def _run(fn, pred, target, **kw):
    """Loss and gradients w.r.t. pred and target of sum(loss * fixed random cotangent)."""
    p = pred.detach().clone().requires_grad_()
    t = target.detach().clone().requires_grad_()
    loss = fn(p, t, **kw)
    cot = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
    (loss * cot).sum().backward()
    return loss.detach(), p.grad, t.grad


def _reference64(pred, target, **kw):
    """The twin in float64 on the CPU, on the same (already rounded) inputs."""
    kw = {k: (v.detach().cpu().double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    return _run(reference.box_loss_reference, pred.detach().cpu().double(), target.detach().cpu().double(), **kw)


def test_native_backend_is_built(device):
    # Everything below compares the native kernels with the reference: make sure they are there.
    assert pyfast.native_available(device.type), _native.unavailable_reason(device.type)
    assert _native.use_native(device.type)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("box_format", list(FORMATS))
@pytest.mark.parametrize("mode", list(MODES))
def test_float64_matches_reference(device, mode, box_format, reduction):
    pred, target = _inputs(257, box_format, seed=1, device=device)
    kw = dict(mode=mode, box_format=box_format, reduction=reduction)
    got = _run(pyfast.box_loss, pred, target, **kw)
    want = _reference64(pred, target, **kw)
    for a, b in zip(got, want):
        assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("box_format", list(FORMATS))
@pytest.mark.parametrize("mode", list(MODES))
def test_float32_matches_float64_reference(device, mode, box_format):
    # Large enough to use several blocks and both threads (CPU), several thread blocks (CUDA).
    pred, target = _inputs(20000, box_format, dtype=torch.float32, seed=2, device=device)
    kw = dict(mode=mode, box_format=box_format, reduction="none")
    loss, gp, gt = _run(pyfast.box_loss, pred, target, **kw)
    rloss, rgp, rgt = _reference64(pred, target, **kw)
    assert loss.dtype == torch.float32 and gp.dtype == torch.float32
    assert_close(loss, rloss, rtol=1e-5, atol=1e-5)
    assert_close(gp, rgp, rtol=1e-4, atol=1e-5)
    assert_close(gt, rgt, rtol=1e-4, atol=1e-5)
    for reduction in ("sum", "mean"):
        got = pyfast.box_loss(pred, target, mode=mode, box_format=box_format, reduction=reduction)
        want = reference.box_loss_reference(pred.cpu().double(), target.cpu().double(), mode=mode,
                                            box_format=box_format, reduction=reduction)  # fmt: skip
        assert_close(got, want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", list(MODES))
def test_half_inputs_loss_float32_grads_in_input_dtype(device, dtype, mode):
    pred, target = _inputs(3000, "xyxy", dtype=dtype, seed=3, device=device)
    loss, gp, gt = _run(pyfast.box_loss, pred, target, mode=mode, reduction="none")
    assert loss.dtype == torch.float32
    assert gp.dtype == dtype and gt.dtype == dtype
    # The reference on the same (already rounded) inputs: the loss is computed in float32, so it is
    # tight; the gradients are rounded to the half type once at the end.
    rloss, rgp, rgt = _reference64(pred, target, mode=mode, reduction="none")
    assert_close(loss, rloss, rtol=1e-5, atol=1e-5)
    step = 2**-8 if dtype == torch.bfloat16 else 2**-11
    assert_close(gp, rgp, rtol=2 * step, atol=1e-4)
    assert_close(gt, rgt, rtol=2 * step, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("box_format", list(FORMATS))
@pytest.mark.parametrize("mode", list(MODES))
def test_nasty_boxes_finite_and_match_reference(device, mode, box_format, dtype):
    names, pred, target = nasty_boxes()
    if box_format == "cxcywh":
        pred, target = _to_cxcywh(pred), _to_cxcywh(target)
    pred, target = pred.to(device, dtype), target.to(device, dtype)  # 1e4-scale boxes fit in half
    loss, gp, gt = _run(pyfast.box_loss, pred, target, mode=mode, box_format=box_format, reduction="none")
    for name, value, g1, g2 in zip(names, loss, gp, gt):
        assert torch.isfinite(value), f"{name}: loss {value}"
        assert torch.isfinite(g1).all() and torch.isfinite(g2).all(), f"{name}: grads {g1} {g2}"
    rloss, rgp, rgt = _reference64(pred, target, mode=mode, box_format=box_format, reduction="none")
    tol = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 1e-3)}[dtype]
    assert_close(loss, rloss, *tol)
    assert_close(gp, rgp, *tol)
    assert_close(gt, rgt, *tol)


def _zero_area_preds(n: int, generator: torch.Generator):
    """Valid targets (shorter side s >= 1e-3) and predictions of zero area: points, zero-width and
    zero-height lines, and slivers 1e-9 wide, anywhere around the targets (float64)."""
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 10
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) ** 3 * 5 + 1e-3
    target = torch.cat([xy, xy + wh], 1)
    corner = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 20 - 5
    size = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 6
    kind = torch.arange(n) % 4
    size[kind == 0] = 0.0  # points
    size[kind == 1, 0] = 0.0  # zero width
    size[kind == 2, 1] = 0.0  # zero height
    size[kind == 3, 0] = 1e-9  # slivers
    return torch.cat([corner, corner + size], 1), target


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", list(MODES))
def test_zero_area_predictions_have_the_documented_gradient_bound(device, mode, dtype):
    # README: |d loss / d coordinate| <= l1_weight / 4 + iou_weight * (2 / s + 128 / c), s the
    # target's shorter side, c the enclosing diagonal (the 128 / c for CIoU only). The plain
    # formulas give up to ~1/eps here.
    pred, target = _zero_area_preds(4000, torch.Generator().manual_seed(31))
    side = (target[:, 2:] - target[:, :2]).min(1).values
    lo, hi = torch.minimum(pred[:, :2], target[:, :2]), torch.maximum(pred[:, 2:], target[:, 2:])
    diag = (hi - lo).norm(dim=1)
    bound = 0.25 + 2 / side + (128 / diag if mode == "ciou" else 0)
    p, t = pred.to(device, dtype).requires_grad_(), target.to(device, dtype)
    pyfast.box_loss(p, t, mode=mode, reduction="sum").backward()
    grad = p.grad.double().cpu().abs().max(1).values
    worst = (grad / bound).max().item()
    assert worst <= 1.001, f"gradient {worst:.3g} x the bound"
    rp = p.detach().cpu().double().requires_grad_()
    reference.box_loss_reference(rp, t.cpu().double(), mode=mode, reduction="sum").backward()
    tol = (1e-10, 1e-12) if dtype == torch.float64 else (1e-4, 1e-4)
    assert_close(p.grad, rp.grad, *tol)


@pytest.mark.parametrize("mode", list(MODES))
def test_both_boxes_of_zero_area_on_one_line_get_no_eps_gradient(device, mode):
    # Zero union and zero enclosing area: the IoU and the GIoU penalty are 0 / eps = 0 and pass no
    # gradient (the clamp's gradient at 0 would otherwise carry 1/eps).
    pred = torch.tensor([[1.0, 2.0, 4.0, 2.0], [3.0, 3.0, 3.0, 3.0]], dtype=torch.float64, device=device)
    target = torch.tensor([[2.0, 2.0, 5.0, 2.0], [3.0, 3.0, 3.0, 3.0]], dtype=torch.float64, device=device)
    loss, gp, gt = _run(pyfast.box_loss, pred, target, mode=mode, reduction="none")
    assert gp.abs().max() <= 1.0 and gt.abs().max() <= 1.0, (gp, gt)
    rloss, rgp, rgt = _reference64(pred, target, mode=mode, reduction="none")
    assert_close(loss, rloss, 1e-12, 1e-12)
    assert_close(gp, rgp, 1e-12, 1e-12)
    assert_close(gt, rgt, 1e-12, 1e-12)


def _scaled_pairs(scale: float):
    """Valid overlapping pairs with coordinates around `scale` (float64)."""
    pred, target = random_boxes(64, generator=torch.Generator().manual_seed(20), scale=1.0)
    return pred * scale, target * scale


@pytest.mark.parametrize("box_format", list(FORMATS))
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize(
    "dtype, scale",
    [(torch.float32, 1e20), (torch.float32, 1e30), (torch.float32, 1e38), (torch.bfloat16, 1e20),
     (torch.bfloat16, 1e30), (torch.bfloat16, 1e37), (torch.float16, 3e4)],
)  # fmt: skip
def test_large_finite_boxes_match_float64(device, dtype, scale, mode, box_format):
    # Areas of 1e20-scale boxes overflow float32: the kernels rescale such pairs by a power of two.
    # 1e38-scale pairs reach 1.6e38, near float32's maximum (3.4e38).
    pred, target = _scaled_pairs(scale)
    if box_format == "cxcywh":
        pred, target = _to_cxcywh(pred), _to_cxcywh(target)
    pred, target = pred.to(device, dtype), target.to(device, dtype)
    kw = dict(mode=mode, box_format=box_format, reduction="none", l1_weight=0.0)
    loss, gp, gt = _run(pyfast.box_loss, pred, target, **kw)
    rloss, rgp, rgt = _reference64(pred, target, **kw)
    assert torch.isfinite(loss).all() and torch.isfinite(gp).all() and torch.isfinite(gt).all()
    assert_close(loss, rloss, rtol=1e-4, atol=1e-5)
    grad_tol = 1e-3 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    assert_close(gp, rgp, rtol=grad_tol, atol=grad_tol * rgp.abs().max().item())
    assert_close(gt, rgt, rtol=grad_tol, atol=grad_tol * rgt.abs().max().item())
    # With the L1 term too, whose value is in coordinate units.
    both = pyfast.box_loss(pred, target, mode=mode, box_format=box_format, reduction="none")
    assert_close(both, _reference64(pred, target, mode=mode, box_format=box_format, reduction="none")[0],
                 rtol=1e-4, atol=0)  # fmt: skip
    assert_close(pyfast.box_iou(pred, target, mode=mode, box_format=box_format),
                 reference.box_iou_reference(pred.cpu().double(), target.cpu().double(), mode=mode,
                                             box_format=box_format), rtol=1e-4, atol=1e-5)  # fmt: skip


def test_one_large_box_issue_example(device):
    # Finite float32 boxes at 1e20: NaN before the rescaling; the float64 reference says 0.444.
    pred = torch.tensor([[0.0, 0.0, 2e20, 2e20]], device=device)
    target = torch.tensor([[1e20, 1e20, 3e20, 3e20]], device=device)
    want = reference.box_loss_reference(pred.cpu().double(), target.cpu().double(), l1_weight=0.0)
    got = pyfast.box_loss(pred, target, l1_weight=0.0)
    assert torch.isfinite(got) and want.item() == pytest.approx(1 - (1 / 7 - 2 / 9), rel=1e-9)
    assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("mode", list(MODES))
def test_float64_beyond_its_own_overflow(device, mode):
    # float64 areas overflow past ~1e154: the same rescaling, checked against scaled-down boxes.
    pred, target = _scaled_pairs(1e200)
    got = _run(pyfast.box_loss, pred.to(device), target.to(device), mode=mode, l1_weight=0.0, reduction="none")
    want = _reference64(pred * 1e-190, target * 1e-190, mode=mode, l1_weight=0.0, reduction="none")
    assert_close(got[0], want[0], rtol=1e-9, atol=1e-12)
    assert_close(got[1] * 1e200, want[1] * 1e10, rtol=1e-9, atol=1e-12)


def test_ordinary_boxes_keep_their_bits(device):
    # A block with one huge pair takes the rescaling path; the ordinary pairs beside it must give
    # exactly what they give in a block of their own.
    pred, target = _inputs(300, "xyxy", dtype=torch.float32, seed=21, device=device)
    big_p, big_t = _scaled_pairs(1e25)

    def loss_and_grads(p, t):
        p, t = p.clone().requires_grad_(), t.clone().requires_grad_()
        loss = pyfast.box_loss(p, t, mode="ciou", reduction="none")
        loss.sum().backward()
        return loss.detach(), p.grad, t.grad

    alone = loss_and_grads(pred, target)
    mixed = loss_and_grads(torch.cat([pred, big_p[:1].float().to(device)]),
                           torch.cat([target, big_t[:1].float().to(device)]))  # fmt: skip
    for a, b in zip(alone, mixed):
        assert torch.equal(a, b[:300])


@pytest.mark.parametrize("target_grad", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_of_16_mb_and_more_keep_their_bits(dtype, reduction, target_grad):
    """The CPU kernels write gradients of 16 MB or more with streaming stores (box_loss_cpu.cpp:
    kStreamGradientBytes). A box's gradient under a summed loss does not depend on the other boxes,
    so the whole must give, bit for bit, what eight parts give with ordinary stores; "sum" takes the
    gradient in the forward, "none" the backward kernel. The boxes end in a partial chunk and hold
    a huge pair, whose block is redone by the rescaling path after its streamed stores."""
    n = (16 << 20) // (4 * dtype.itemsize) + 77
    pred, target = _inputs(n, "xyxy", dtype=dtype, seed=22)
    big_p, big_t = _scaled_pairs(1e25 if dtype == torch.float32 else 1e200)
    pred[5000], target[5000] = big_p[0].to(dtype), big_t[0].to(dtype)

    def grads(p, t):
        p, t = p.clone().requires_grad_(), t.clone().requires_grad_(target_grad)
        loss = pyfast.box_loss(p, t, mode="ciou", reduction=reduction)
        loss.sum().backward()
        return p.grad, t.grad

    whole = grads(pred, target)
    parts = [grads(p, t) for p, t in zip(pred.chunk(8), target.chunk(8))]
    assert torch.isfinite(whole[0]).all()
    assert torch.equal(whole[0], torch.cat([g for g, _ in parts]))
    if target_grad:
        assert torch.equal(whole[1], torch.cat([g for _, g in parts]))


def test_known_values(device):
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0]], device=device)
    target = torch.tensor([[1.0, 1.0, 3.0, 3.0]], device=device)
    iou = 1 / 7
    assert pyfast.box_iou(pred, target).item() == pytest.approx(iou, rel=1e-6)
    assert pyfast.box_iou(pred, target, mode="giou").item() == pytest.approx(iou - 2 / 9, rel=1e-6)
    # centres 2 apart diagonally: rho2 = 2, enclosing diagonal^2 = 18
    assert pyfast.box_iou(pred, target, mode="diou").item() == pytest.approx(iou - 2 / 18, rel=1e-6)
    # same aspect ratio: the ciou penalty vanishes
    assert pyfast.box_iou(pred, target, mode="ciou").item() == pytest.approx(iou - 2 / 18, rel=1e-6)
    loss = pyfast.box_loss(pred, target, mode="giou", l1_weight=2.0, iou_weight=3.0)
    assert loss.item() == pytest.approx(2.0 * 1.0 + 3.0 * (1 - (iou - 2 / 9)), rel=1e-6)


@pytest.mark.parametrize("mode", list(MODES))
def test_box_iou_matches_reference_with_gradients(device, mode):
    pred, target = _inputs(500, "xyxy", seed=4, device=device)
    got = _run(pyfast.box_iou, pred, target, mode=mode)
    want = _run(reference.box_iou_reference, pred.cpu(), target.cpu(), mode=mode)
    for a, b in zip(got, want):
        assert_close(a, b, rtol=1e-10, atol=1e-12)


# ciou is left out on purpose: its alpha is a constant for the gradient (the contract, as in
# torchvision), so its analytical gradient is deliberately not the numerical derivative. Its
# gradient is checked against the reference's autograd in the tests above.
@pytest.mark.parametrize("mode", ["iou", "giou", "diou"])
def test_gradcheck_native_float64(device, mode):
    pred, target = _inputs(12, "xyxy", seed=5, device=device)
    pred.requires_grad_()
    target.requires_grad_()
    for weight in (torch.rand(12, dtype=torch.float64), torch.rand(12, 4, dtype=torch.float64)):
        weight = weight.to(device).requires_grad_()
        assert torch.autograd.gradcheck(
            lambda p, t, w: pyfast.box_loss(p, t, mode=mode, weight=w, reduction="none"), (pred, target, weight)
        )
    assert torch.autograd.gradcheck(lambda p, t: pyfast.box_iou(p, t, mode=mode), (pred, target))
    # The op itself is differentiable, not only the public function.
    assert torch.autograd.gradcheck(
        lambda p, t: torch.ops.pyfast.box_loss_forward(p, t, None, reduction="sum", avg_factor=None,
                                                       **{**OPTIONS, "mode": mode}), (pred, target))  # fmt: skip


def test_weight_avg_factor_and_target_gradients(device):
    pred, target = _inputs(300, "xyxy", dtype=torch.float32, seed=6, device=device)
    weight = torch.rand(300, device=device)
    for avg_factor in (None, 37.5, torch.tensor(37.5, device=device)):
        kw = dict(mode="ciou", weight=weight, avg_factor=avg_factor, l1_weight=0.7, iou_weight=1.3)
        got = _run(pyfast.box_loss, pred, target, **kw)
        want = _reference64(pred, target, **kw)
        for a, b in zip(got, want):
            assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(50,), (50, 4)])
def test_weight_gradient(device, shape):
    pred, target = _inputs(50, "xyxy", seed=7, device=device)
    w1 = torch.rand(shape, dtype=torch.float64, device=device, requires_grad=True)
    w2 = w1.detach().cpu().clone().requires_grad_()
    pyfast.box_loss(pred, target, weight=w1, reduction="sum").backward()
    reference.box_loss_reference(pred.cpu(), target.cpu(), weight=w2, reduction="sum").backward()
    assert_close(w1.grad, w2.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("box_format", list(FORMATS))
@pytest.mark.parametrize("mode", list(MODES))
def test_per_coordinate_weight_matches_float64_reference(device, mode, box_format, dtype):
    # mmdet's (N, 4) bbox weights: per coordinate on the L1 term, their mean on the IoU term.
    pred, target = _inputs(400, box_format, dtype=dtype, seed=22, device=device)
    weight = torch.rand(400, 4, dtype=torch.float64)
    weight[::7] = 0.0  # the negatives of a detection head
    weight[1::7, 2:] = 0.0
    weight = weight.to(device)
    kw = dict(mode=mode, box_format=box_format, l1_weight=0.6, iou_weight=1.7, reduction="none")
    got_loss, got_gp, got_gt = _run(lambda p, t, **k: pyfast.box_loss(p, t, weight=weight, **k), pred, target, **kw)
    w64 = weight.cpu().double()
    want_loss, want_gp, want_gt = _run(lambda p, t, **k: reference.box_loss_reference(p, t, weight=w64, **k),
                                       pred.cpu().double(), target.cpu().double(), **kw)  # fmt: skip
    tol = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 1e-3)}[dtype]
    assert_close(got_loss, want_loss, rtol=tol[0] if dtype != torch.bfloat16 else 1e-5, atol=tol[1])
    assert_close(got_gp, want_gp, *tol)
    assert_close(got_gt, want_gt, *tol)
    # The definition, written out: a row of equal weights is the (N,) weight.
    same = pyfast.box_loss(pred, target, weight=torch.full((400, 4), 0.3, device=device), **kw)
    assert_close(same, pyfast.box_loss(pred, target, weight=torch.full((400,), 0.3, device=device), **kw),
                 rtol=1e-6 if dtype != torch.float64 else 1e-14, atol=0)  # fmt: skip


def test_box_loss_module(device):
    pred, target = _inputs(64, "cxcywh", dtype=torch.float32, seed=23, device=device)
    weight = torch.rand(64, 4, device=device)
    loss_fn = pyfast.BoxLoss(mode="diou", box_format="cxcywh", l1_weight=0.5, iou_weight=2.0)
    assert isinstance(loss_fn, torch.nn.Module) and "diou" in repr(loss_fn)
    got = loss_fn(pred, target, weight, avg_factor=torch.tensor(12.0, device=device))
    want = pyfast.box_loss(pred, target, mode="diou", box_format="cxcywh", l1_weight=0.5, iou_weight=2.0,
                           weight=weight, avg_factor=torch.tensor(12.0, device=device))  # fmt: skip
    assert torch.equal(got, want)
    assert loss_fn(pred, target).shape == ()
    assert pyfast.BoxLoss(reduction="none")(pred, target).shape == (64,)
    with pytest.raises(ValueError, match="mode"):
        pyfast.BoxLoss(mode="sqiou")


def test_empty_input_gives_zero_with_gradient(device):
    pred = torch.zeros(0, 4, device=device, requires_grad=True)
    target = torch.zeros(0, 4, device=device)
    for reduction in ("mean", "sum"):
        loss = pyfast.box_loss(pred, target, reduction=reduction)
        assert loss.shape == () and loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert pred.grad.shape == (0, 4)
    assert pyfast.box_loss(pred, target, reduction="none").shape == (0,)
    assert pyfast.box_iou(pred, target).shape == (0,)


def test_non_contiguous_inputs(device):
    pred, target = _inputs(400, "xyxy", dtype=torch.float32, seed=8, device=device)
    wide_p = torch.zeros(400, 8, device=device)
    wide_p[:, ::2] = pred
    t_cm = target.T.contiguous().T  # column-major
    assert not wide_p[:, ::2].is_contiguous() and not t_cm.is_contiguous()
    got = pyfast.box_loss(wide_p[:, ::2], t_cm, reduction="none")
    want = pyfast.box_loss(pred, target, reduction="none")
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_mixed_dtypes_promote(device):
    pred, target = _inputs(64, "xyxy", seed=9, device=device)
    p16 = pred.half().requires_grad_()
    loss = pyfast.box_loss(p16, target.float())
    loss.backward()
    assert loss.dtype == torch.float32 and p16.grad.dtype == torch.float16
    want = reference.box_loss_reference(pred.half().cpu().double(), target.float().cpu().double())
    assert_close(loss, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("mode", list(MODES))
def test_nonfinite_input_gives_nan_never_zero(device, mode, bad):
    pred, target = _inputs(10, "xyxy", dtype=torch.float32, seed=10, device=device)
    pred[3, 2] = bad
    for l1_weight in (1.0, 0.0):
        p = pred.clone().requires_grad_()
        loss = pyfast.box_loss(p, target, mode=mode, reduction="none", l1_weight=l1_weight)
        assert torch.isnan(loss[3]) and torch.isfinite(loss[torch.arange(10, device=device) != 3]).all()
        assert torch.isnan(pyfast.box_loss(pred, target, mode=mode, l1_weight=l1_weight))
        loss.sum().backward()
        assert torch.isnan(p.grad[3]).all()
    assert torch.isnan(pyfast.box_iou(pred, target, mode=mode)[3])
    assert torch.isnan(pyfast.box_loss(target, pred, mode=mode, reduction="sum"))


def test_reduction_independent_of_thread_count():
    pred, target = _inputs(100_003, "xyxy", dtype=torch.float32, seed=11)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(pyfast.box_loss(pred, target, reduction="sum"))
    finally:
        torch.set_num_threads(before)
    assert results[0].item() == results[1].item() == results[2].item()


def test_opcheck(device):
    pred, target = _inputs(33, "xyxy", dtype=torch.float32, seed=12, device=device)
    weight = torch.rand(33, device=device)
    weight4 = torch.rand(33, 4, device=device)
    forward = torch.ops.pyfast.box_loss_forward.default
    for args, kwargs in (
        ((pred, target, None), dict(OPTIONS, reduction="mean", avg_factor=None)),
        ((pred, target, weight), dict(OPTIONS, mode="ciou", box_format="cxcywh", l1_weight=0.5, iou_weight=2.0,
                                      reduction="none", avg_factor=None)),
        ((pred, target, weight4), dict(OPTIONS, mode="iou", reduction="sum", avg_factor=None)),
        ((pred.double(), target.double(), weight.double()), dict(OPTIONS, mode="diou", reduction="mean",
                                                                 avg_factor=10.0)),
    ):  # fmt: skip
        torch.library.opcheck(forward, args, kwargs)
        # ... and with gradients: opcheck then also checks the autograd registered on the op.
        grad_args = (args[0].clone().requires_grad_(), args[1].clone().requires_grad_(), args[2])
        torch.library.opcheck(forward, grad_args, kwargs)
    grad = torch.tensor(1.0, device=device)
    # The backward returns the gradients asked for: pred's, then target's and weight's when wanted.
    for w, target_grad, weight_grad, count in ((weight, True, True, 3), (weight4, True, True, 3),
                                               (weight, False, True, 2), (None, False, False, 1)):  # fmt: skip
        args = (grad, pred, target, w)
        kwargs = dict(OPTIONS, target_grad=target_grad, weight_grad=weight_grad, reduction="mean", avg_factor=None)
        torch.library.opcheck(torch.ops.pyfast.box_loss_backward.default, args, kwargs)
        assert len(torch.ops.pyfast.box_loss_backward.default(*args, **kwargs)) == count
    iou_kw = dict(mode="iou", box_format="xyxy", eps=1e-7)
    torch.library.opcheck(torch.ops.pyfast.box_iou.default, (pred, target), iou_kw)
    torch.library.opcheck(torch.ops.pyfast.box_iou.default, (pred.clone().requires_grad_(), target), iou_kw)


def _two_pass(pred, target, weight, **kw):
    """The loss through box_loss_forward, whose backward recomputes from the inputs."""
    return torch.ops.pyfast.box_loss_forward(pred, target, weight, **kw)


def _grads_of(loss_fn, pred, target, weight, target_grad, scale):
    p, t = pred.clone().requires_grad_(), target.clone().requires_grad_(target_grad)
    loss = loss_fn(p, t, weight)
    (loss * scale if scale != 1.0 else loss).backward()
    return loss.detach(), p.grad, t.grad


@pytest.mark.parametrize("weight_kind", ["none", "per_box", "per_coordinate"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("box_format", list(FORMATS))
@pytest.mark.parametrize("mode", list(MODES))
def test_gradient_in_forward_matches_the_two_passes(mode, box_format, dtype, weight_kind):
    """On the CPU a reduced loss whose pred requires grad computes its gradient in the forward pass:
    the same bits as the backward kernel for loss.backward(), and a scaled copy for other grad_out.
    The pairs include the nasty ones and coordinates that need the scaling step."""
    names, nasty_pred, nasty_target = nasty_boxes()
    big_pred, big_target = _scaled_pairs(2.0**30 if dtype == torch.float64 else 2.0**24)
    pred, target = _inputs(3000, box_format, dtype=torch.float64, seed=15)
    if dtype == torch.float64:
        pred, target = torch.cat([pred, nasty_pred, big_pred]), torch.cat([target, nasty_target, big_target])
    else:
        pred, target = torch.cat([pred, nasty_pred]), torch.cat([target, nasty_target])
    pred, target = pred.to(dtype), target.to(dtype)
    n = pred.shape[0]
    weight = {"none": None, "per_box": torch.rand(n, dtype=torch.float64),
              "per_coordinate": torch.rand(n, 4, dtype=torch.float64)}[weight_kind]  # fmt: skip
    if weight is not None:
        weight = weight.to(torch.float64 if dtype == torch.float64 else torch.float32)
    kw = dict(OPTIONS, mode=mode, box_format=box_format)
    for reduction, avg_factor in (("mean", None), ("sum", None), ("mean", 77.0)):
        fused = lambda p, t, w: pyfast.box_loss(p, t, weight=w, reduction=reduction, avg_factor=avg_factor, **kw)
        two_pass = lambda p, t, w: _two_pass(p, t, w, reduction=reduction, avg_factor=avg_factor, **kw)
        for target_grad in (False, True):
            p = pred.clone().requires_grad_()
            assert type(fused(p, target, weight).grad_fn).__name__ == "BoxLossForwardWithGradBackward"
            ours = _grads_of(fused, pred, target, weight, target_grad, 1.0)
            theirs = _grads_of(two_pass, pred, target, weight, target_grad, 1.0)
            for a, b in zip(ours, theirs):
                assert (a is None and b is None) or torch.equal(a, b)
            # Any other grad_out scales the saved gradient: equal to the backward up to rounding.
            ours = _grads_of(fused, pred, target, weight, target_grad, 0.375)
            theirs = _grads_of(two_pass, pred, target, weight, target_grad, 0.375)
            for a, b in zip(ours[1:], theirs[1:]):
                if a is not None:  # terms that cancel to ~0 differ by rounding at the gradient's scale
                    tol = 4e-3 if dtype == torch.float16 else 1e-6
                    torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


def test_gradient_in_forward_only_where_it_pays():
    pred, target = _inputs(40, "xyxy", dtype=torch.float32, seed=16)
    p = pred.clone().requires_grad_()
    name = lambda loss: type(loss.grad_fn).__name__
    assert name(pyfast.box_loss(p, target)) == "BoxLossForwardWithGradBackward"
    assert name(pyfast.box_loss(p, target, reduction="none")) == "BoxLossForwardBackward"
    assert name(pyfast.box_loss(p, target, weight=torch.rand(40, requires_grad=True))) == "BoxLossForwardBackward"
    assert name(pyfast.box_loss(pred, target.clone().requires_grad_())) == "BoxLossForwardBackward"
    with torch.no_grad():
        assert pyfast.box_loss(p, target).grad_fn is None
    with pyfast_env(backend="reference"):
        assert name(pyfast.box_loss(p, target)) == "BoxLossForwardBackward"


def test_gradient_in_forward_edge_cases():
    pred, target = _inputs(50, "xyxy", dtype=torch.float32, seed=17)
    p = pred.clone().requires_grad_()
    assert_second_backward_repeats(pyfast.box_loss(p, target), p)
    # An empty batch: zero loss, an empty gradient.
    p = pred[:0].clone().requires_grad_()
    loss = pyfast.box_loss(p, target[:0], reduction="sum")
    loss.backward()
    assert loss.item() == 0.0 and p.grad.shape == (0, 4)
    # A NaN coordinate: a NaN loss and NaN gradients for its box, never zeros.
    bad = pred.clone()
    bad[3, 1] = math.nan
    p = bad.requires_grad_()
    loss = pyfast.box_loss(p, target)
    loss.backward()
    assert math.isnan(loss.item()) and torch.isnan(p.grad[3]).all() and torch.isfinite(p.grad[4:]).all()
    # The op itself refuses what it cannot compute, naming the argument.
    with pytest.raises(ValueError, match="weight requires grad"):
        torch.ops.pyfast.box_loss_forward_with_grad(pred.clone().requires_grad_(), target,
                                                    torch.rand(50, requires_grad=True), False, reduction="sum",
                                                    avg_factor=None, **OPTIONS)  # fmt: skip
    with pytest.raises(ValueError, match="reduction"):
        torch.ops.pyfast.box_loss_forward_with_grad(pred, target, None, False, reduction="none", avg_factor=None,
                                                    **OPTIONS)  # fmt: skip


def test_gradient_in_forward_reference_kernel():
    """The op's reference twin (devices without native kernels) differentiates the reference below
    the op's own Autograd kernel."""
    pred, target = _inputs(30, "xyxy", dtype=torch.float64, seed=18)
    results = []
    for backend in ("reference", "auto"):
        with pyfast_env(backend=backend):
            p, t = pred.clone().requires_grad_(), target.clone().requires_grad_()
            loss, grad_pred, grad_target = torch.ops.pyfast.box_loss_forward_with_grad(
                p, t, None, True, reduction="mean", avg_factor=None, **OPTIONS)  # fmt: skip
            (2.0 * loss).backward()
            results.append((loss.detach(), grad_pred, grad_target, p.grad, t.grad))
    for ref, native in zip(*results):
        torch.testing.assert_close(ref, native, rtol=1e-9, atol=1e-12)
    assert torch.equal(results[1][3], 2.0 * results[1][1])


def test_gradient_in_forward_opcheck():
    pred, target = _inputs(33, "xyxy", dtype=torch.float32, seed=19)
    op = torch.ops.pyfast.box_loss_forward_with_grad.default
    for weight, target_grad, kw in (
        (None, False, dict(OPTIONS, reduction="mean", avg_factor=None)),
        (torch.rand(33), True, dict(OPTIONS, mode="ciou", box_format="cxcywh", reduction="sum", avg_factor=None)),
        (torch.rand(33, 4), True, dict(OPTIONS, mode="diou", reduction="mean", avg_factor=5.0)),
    ):  # fmt: skip
        torch.library.opcheck(op, (pred, target, weight, target_grad), kw)
        grad_args = (pred.clone().requires_grad_(), target.clone().requires_grad_(target_grad), weight, target_grad)
        torch.library.opcheck(op, grad_args, kw)


def test_torch_compile_fullgraph(device):
    pred, target = _inputs(128, "xyxy", dtype=torch.float32, seed=13, device=device)
    weight = torch.rand(128, 4, device=device)
    avg_factor = torch.tensor(3.0, device=device)
    ciou = pyfast.BoxLoss("ciou")

    def step(p, t):
        return (pyfast.box_loss(p, t, mode="giou", weight=weight, avg_factor=avg_factor) + pyfast.box_iou(p, t).mean()
                + ciou(p, t))  # fmt: skip

    compiled = torch.compile(step, fullgraph=True)
    p1 = pred.clone().requires_grad_()
    p2 = pred.clone().requires_grad_()
    out1, out2 = compiled(p1, target), step(p2, target)
    out1.backward()
    out2.backward()
    torch.testing.assert_close(out1, out2)
    torch.testing.assert_close(p1.grad, p2.grad)


def test_double_backward_raises_naming_the_op(device):
    pred, target = _inputs(8, "xyxy", seed=14, device=device)
    p = pred.clone().requires_grad_()
    (g,) = torch.autograd.grad(pyfast.box_loss(p, target, mode="diou"), p, create_graph=True)
    with pytest.raises(RuntimeError, match=r"pyfast\.box_loss has no second derivative"):
        g.sum().backward()
    (g,) = torch.autograd.grad(pyfast.box_iou(p, target).sum(), p, create_graph=True)
    with pytest.raises(RuntimeError, match=r"pyfast\.box_iou has no second derivative"):
        torch.autograd.grad(g.sum(), p)
    # create_graph alone (a gradient penalty elsewhere in the graph) is fine.
    (g,) = torch.autograd.grad(pyfast.box_loss(p, target), p, create_graph=True)
    assert torch.isfinite(g).all() and g.requires_grad


class TestAvgFactor:
    def setup_method(self):
        self.pred, self.target = _inputs(8, "xyxy", dtype=torch.float32)

    @pytest.mark.parametrize("value", [torch.tensor([2.0, 3.0]), torch.ones(1, 2), torch.tensor([])])
    def test_tensor_must_hold_one_element(self, value):
        with pytest.raises(ValueError, match="avg_factor"):
            pyfast.box_loss(self.pred, self.target, avg_factor=value)

    def test_one_element_tensor_of_any_shape_divides(self, device):
        pred, target = self.pred.to(device), self.target.to(device)
        total = pyfast.box_loss(pred, target, reduction="sum")
        for value in (torch.tensor([4.0]), torch.tensor([[4.0]]), torch.tensor(4, dtype=torch.int64)):
            got = pyfast.box_loss(pred, target, avg_factor=value.to(device))
            assert got.shape == () and got.item() == pytest.approx(total.item() / 4, rel=1e-6)

    def test_zero_tensor_divides_by_eps_never_inf(self, device):
        pred, target = self.pred.to(device), self.target.to(device)
        zero = torch.tensor(0.0, device=device)
        loss = pyfast.box_loss(pred, target, avg_factor=zero)
        eps = torch.finfo(torch.float32).eps
        assert torch.isfinite(loss)
        assert loss.item() == pytest.approx(pyfast.box_loss(pred, target, reduction="sum").item() / eps, rel=1e-6)
        # A batch with no positives: zero weights, zero count, zero loss and gradient.
        p = pred.clone().requires_grad_()
        loss = pyfast.box_loss(p, target, weight=torch.zeros(8, device=device), avg_factor=zero)
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(p.grad, torch.zeros_like(p))

    @pytest.mark.parametrize("reduction", ["sum", "none"])
    def test_only_with_mean(self, reduction):
        for value in (2.0, torch.tensor(2.0)):
            with pytest.raises(ValueError, match="avg_factor"):
                pyfast.box_loss(self.pred, self.target, reduction=reduction, avg_factor=value)


class TestBadInput:
    def setup_method(self):
        self.pred, self.target = _inputs(8, "xyxy", dtype=torch.float32)

    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="pred"):
            pyfast.box_loss(self.pred.tolist(), self.target)
        with pytest.raises(TypeError, match="weight"):
            pyfast.box_loss(self.pred, self.target, weight=[1.0] * 8)

    def test_integer_dtype(self):
        with pytest.raises(TypeError, match="target"):
            pyfast.box_loss(self.pred, self.target.long())
        with pytest.raises(TypeError, match="weight"):
            pyfast.box_loss(self.pred, self.target, weight=torch.ones(8, dtype=torch.int64))

    @pytest.mark.parametrize("shape", [(8,), (8, 5), (2, 4, 4)])
    def test_wrong_shape(self, shape):
        with pytest.raises(ValueError, match=r"pred must have shape \(N, 4\)"):
            pyfast.box_loss(torch.zeros(shape), torch.zeros(shape))

    def test_mismatched_n(self):
        with pytest.raises(ValueError, match="target must have the shape of pred"):
            pyfast.box_loss(self.pred, self.target[:5])

    def test_different_devices(self):
        with pytest.raises(ValueError, match="target is on meta"):
            pyfast.box_loss(self.pred, self.target.to("meta"))

    @pytest.mark.parametrize("shape", [(7,), (8, 3), (8, 1), (8, 4, 1)])
    def test_weight_shape(self, shape):
        with pytest.raises(ValueError, match=r"weight must have shape \(8,\) or \(8, 4\)"):
            pyfast.box_loss(self.pred, self.target, weight=torch.ones(shape))

    @pytest.mark.parametrize("kw, name", [
        (dict(mode="sqiou"), "mode"), (dict(box_format="xywh"), "box_format"), (dict(reduction="max"), "reduction"),
    ])  # fmt: skip
    def test_unknown_choice(self, kw, name):
        with pytest.raises(ValueError, match=name):
            pyfast.box_loss(self.pred, self.target, **kw)

    @pytest.mark.parametrize("kw, name", [
        (dict(eps=-1.0), "eps"), (dict(avg_factor=0), "avg_factor"), (dict(l1_weight=math.nan), "l1_weight"),
    ])  # fmt: skip
    def test_bad_numbers(self, kw, name):
        with pytest.raises(ValueError, match=name):
            pyfast.box_loss(self.pred, self.target, **kw)

    def test_direct_op_call_is_validated(self):
        with pytest.raises(ValueError, match="target must have the shape of pred"):
            torch.ops.pyfast.box_loss_forward(self.pred, self.target[:3], None, reduction="mean", avg_factor=None,
                                              **OPTIONS)  # fmt: skip
        with pytest.raises(ValueError, match="BoxLossOptions.mode must be one of"):
            torch.ops.pyfast.box_loss_forward(self.pred, self.target, None, reduction="mean", avg_factor=None,
                                              **{**OPTIONS, "mode": "sqiou"})  # fmt: skip


def test_reference_backend_forced(device):
    pred, target = _inputs(16, "xyxy", dtype=torch.float32, device=device)
    calls = []
    real = reference.box_loss_reference
    with pytest.MonkeyPatch.context() as mp, pyfast_env(backend="reference"):
        mp.setattr(reference, "box_loss_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
        p = pred.clone().requires_grad_()
        loss = pyfast.box_loss(p, target)
        loss.backward()
        # The forward and the backward kernels both ran the twin, on the op itself.
        assert len(calls) == 2
        assert type(loss.grad_fn).__name__ == "BoxLossForwardBackward"
    p_native = pred.clone().requires_grad_()
    loss_native = pyfast.box_loss(p_native, target)
    loss_native.backward()
    torch.testing.assert_close(loss, loss_native, rtol=1e-5, atol=0, check_dtype=True)
    torch.testing.assert_close(p.grad, p_native.grad, rtol=1e-5, atol=1e-7)


def test_missing_backend_warns_once_and_falls_back(monkeypatch):
    pred, target = _inputs(16, "xyxy", dtype=torch.float32)
    monkeypatch.setattr(_native, "unavailable_reason", lambda device_type: "it was not built, for this test")
    with pyfast_env(backend="auto"):
        assert not torch._C._dispatch_has_kernel_for_dispatch_key("pyfast::box_loss_forward", "CPU")
        with pytest.warns(RuntimeWarning, match="no native cpu kernels .it was not built, for this test"):
            first = pyfast.box_loss(pred, target)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            pyfast.box_loss(pred, target)  # no second warning
            torch.ops.pyfast.box_loss_forward(pred, target, None, reduction="mean", avg_factor=None, **OPTIONS)
        want = reference.box_loss_reference(pred, target)
        torch.testing.assert_close(first, want)
    monkeypatch.undo()
    _native.reload_backend_setting()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("pyfast::box_loss_forward", "CPU")


def test_native_setting_without_backend_raises(monkeypatch):
    pred, target = _inputs(4, "xyxy", dtype=torch.float32)
    monkeypatch.setattr(_native, "unavailable_reason", lambda device_type: "not built, for this test")
    with pyfast_env(backend="native"):
        with pytest.raises(RuntimeError, match="PYFAST_BACKEND=native, but pyfast has no native cpu kernels"):
            pyfast.box_loss(pred, target)
    monkeypatch.undo()
    _native.reload_backend_setting()
