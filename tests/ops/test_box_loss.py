"""pyfast.box_loss / box_iou against the float64 reference twin, plus the contract's edge cases."""

from __future__ import annotations

import math

import pytest
import torch

import pyfast
from pyfast import _native
from pyfast.ops import reference
from pyfast.ops.box_loss import FORMATS, MODES

from boxes import nasty_boxes, random_boxes
from conftest import assert_close, requires_cuda

REDUCTIONS = ["none", "sum", "mean"]


def _to_cxcywh(b):
    return torch.cat([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], 1)


def _inputs(n, box_format, dtype=torch.float64, seed=0):
    pred, target = random_boxes(n, generator=torch.Generator().manual_seed(seed))
    if box_format == "cxcywh":
        pred, target = _to_cxcywh(pred), _to_cxcywh(target)
    return pred.to(dtype), target.to(dtype)


def _run(fn, pred, target, **kw):
    """Loss and gradients w.r.t. pred and target of sum(loss * fixed random cotangent)."""
    p = pred.detach().clone().requires_grad_()
    t = target.detach().clone().requires_grad_()
    loss = fn(p, t, **kw)
    cot = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    (loss * cot).sum().backward()
    return loss.detach(), p.grad, t.grad


def _reference64(pred, target, **kw):
    return _run(reference.box_loss_reference, pred.double(), target.double(), **kw)


def test_native_cpu_backend_is_built():
    # Everything below compares the native kernels with the reference: make sure they are there.
    assert pyfast.native_available("cpu")
    assert _native.use_native("cpu")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("box_format", list(FORMATS))
@pytest.mark.parametrize("mode", list(MODES))
def test_float64_matches_reference(mode, box_format, reduction):
    pred, target = _inputs(257, box_format, seed=1)
    kw = dict(mode=mode, box_format=box_format, reduction=reduction)
    got = _run(pyfast.box_loss, pred, target, **kw)
    want = _reference64(pred, target, **kw)
    for a, b in zip(got, want):
        assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("box_format", list(FORMATS))
@pytest.mark.parametrize("mode", list(MODES))
def test_float32_matches_float64_reference(mode, box_format):
    # Large enough to use several blocks and both threads.
    pred, target = _inputs(20000, box_format, dtype=torch.float32, seed=2)
    kw = dict(mode=mode, box_format=box_format, reduction="none")
    loss, gp, gt = _run(pyfast.box_loss, pred, target, **kw)
    rloss, rgp, rgt = _reference64(pred, target, **kw)
    assert loss.dtype == torch.float32 and gp.dtype == torch.float32
    assert_close(loss, rloss, rtol=1e-5, atol=1e-5)
    assert_close(gp, rgp, rtol=1e-4, atol=1e-5)
    assert_close(gt, rgt, rtol=1e-4, atol=1e-5)
    for reduction in ("sum", "mean"):
        got = pyfast.box_loss(pred, target, mode=mode, box_format=box_format, reduction=reduction)
        want = reference.box_loss_reference(pred.double(), target.double(), mode=mode, box_format=box_format,
                                            reduction=reduction)
        assert_close(got, want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", list(MODES))
def test_half_inputs_loss_float32_grads_in_input_dtype(dtype, mode):
    pred, target = _inputs(3000, "xyxy", dtype=dtype, seed=3)
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
def test_nasty_boxes_finite_and_match_reference(mode, box_format, dtype):
    names, pred, target = nasty_boxes()
    if dtype == torch.float16:  # 1e4-scale boxes fit in half (max 65504)
        pred, target = pred.half(), target.half()
    if box_format == "cxcywh":
        pred, target = _to_cxcywh(pred.double()).to(dtype), _to_cxcywh(target.double()).to(dtype)
    pred, target = pred.to(dtype), target.to(dtype)
    loss, gp, gt = _run(pyfast.box_loss, pred, target, mode=mode, box_format=box_format, reduction="none")
    for name, value, g1, g2 in zip(names, loss, gp, gt):
        assert torch.isfinite(value), f"{name}: loss {value}"
        assert torch.isfinite(g1).all() and torch.isfinite(g2).all(), f"{name}: grads {g1} {g2}"
    rloss, rgp, rgt = _reference64(pred, target, mode=mode, box_format=box_format, reduction="none")
    tol = dict(float64=(1e-10, 1e-12), float32=(1e-5, 1e-5), float16=(4e-3, 1e-3))[str(dtype)[6:]]
    assert_close(loss, rloss, *tol)
    assert_close(gp, rgp, *tol)
    assert_close(gt, rgt, *tol)


def test_known_values():
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    target = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
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
def test_box_iou_matches_reference_with_gradients(mode):
    pred, target = _inputs(500, "xyxy", seed=4)
    got = _run(pyfast.box_iou, pred, target, mode=mode)
    want = _run(reference.box_iou_reference, pred, target, mode=mode)
    for a, b in zip(got, want):
        assert_close(a, b, rtol=1e-10, atol=1e-12)


# ciou is left out on purpose: its alpha is a constant for the gradient (the contract, as in
# torchvision), so its analytical gradient is deliberately not the numerical derivative. Its
# gradient is checked against the reference's autograd in the tests above.
@pytest.mark.parametrize("mode", ["iou", "giou", "diou"])
def test_gradcheck_native_float64(mode):
    pred, target = _inputs(12, "xyxy", seed=5)
    pred.requires_grad_()
    target.requires_grad_()
    weight = torch.rand(12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda p, t, w: pyfast.box_loss(p, t, mode=mode, weight=w, reduction="none"), (pred, target, weight)
    )
    assert torch.autograd.gradcheck(lambda p, t: pyfast.box_iou(p, t, mode=mode), (pred, target))


def test_weight_avg_factor_and_target_gradients():
    pred, target = _inputs(300, "xyxy", dtype=torch.float32, seed=6)
    weight = torch.rand(300)
    for avg_factor in (None, 37.5, torch.tensor(37.5)):
        kw = dict(mode="ciou", weight=weight, avg_factor=avg_factor, l1_weight=0.7, iou_weight=1.3)
        got = _run(pyfast.box_loss, pred, target, **kw)
        want = _run(reference.box_loss_reference, pred.double(), target.double(),
                    **{**kw, "weight": weight.double()})
        for a, b in zip(got, want):
            assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_weight_gradient():
    pred, target = _inputs(50, "xyxy", seed=7)
    w1 = torch.rand(50, dtype=torch.float64, requires_grad=True)
    w2 = w1.detach().clone().requires_grad_()
    pyfast.box_loss(pred, target, weight=w1, reduction="sum").backward()
    reference.box_loss_reference(pred, target, weight=w2, reduction="sum").backward()
    assert_close(w1.grad, w2.grad, rtol=1e-10, atol=1e-12)


def test_empty_input_gives_zero_with_gradient():
    pred = torch.zeros(0, 4, requires_grad=True)
    target = torch.zeros(0, 4)
    for reduction in ("mean", "sum"):
        loss = pyfast.box_loss(pred, target, reduction=reduction)
        assert loss.shape == () and loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert pred.grad.shape == (0, 4)
    assert pyfast.box_loss(pred, target, reduction="none").shape == (0,)
    assert pyfast.box_iou(pred, target).shape == (0,)


def test_non_contiguous_inputs():
    pred, target = _inputs(400, "xyxy", dtype=torch.float32, seed=8)
    wide_p = torch.zeros(400, 8)
    wide_p[:, ::2] = pred
    t_cm = target.T.contiguous().T  # column-major
    assert not wide_p[:, ::2].is_contiguous() and not t_cm.is_contiguous()
    got = pyfast.box_loss(wide_p[:, ::2], t_cm, reduction="none")
    want = pyfast.box_loss(pred, target, reduction="none")
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_mixed_dtypes_promote():
    pred, target = _inputs(64, "xyxy", seed=9)
    p16 = pred.half().requires_grad_()
    loss = pyfast.box_loss(p16, target.float())
    loss.backward()
    assert loss.dtype == torch.float32 and p16.grad.dtype == torch.float16
    want = reference.box_loss_reference(pred.half().double(), target.float().double())
    assert_close(loss, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("mode", list(MODES))
def test_nonfinite_input_gives_nan_never_zero(mode, bad):
    pred, target = _inputs(10, "xyxy", dtype=torch.float32, seed=10)
    pred[3, 2] = bad
    for l1_weight in (1.0, 0.0):
        p = pred.clone().requires_grad_()
        loss = pyfast.box_loss(p, target, mode=mode, reduction="none", l1_weight=l1_weight)
        assert torch.isnan(loss[3]) and torch.isfinite(loss[torch.arange(10) != 3]).all()
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


def test_opcheck():
    pred, target = _inputs(33, "xyxy", dtype=torch.float32, seed=12)
    weight = torch.rand(33)
    for args in (
        (pred, target, None, MODES["giou"], FORMATS["xyxy"], 1.0, 1.0, 1e-7, 2, None),
        (pred, target, weight, MODES["ciou"], FORMATS["cxcywh"], 0.5, 2.0, 1e-7, 0, None),
        (pred.double(), target.double(), weight.double(), MODES["diou"], FORMATS["xyxy"], 1.0, 1.0, 1e-7, 2, 10.0),
    ):
        torch.library.opcheck(torch.ops.pyfast.box_loss_forward.default, args)
    grad = torch.tensor(1.0)
    torch.library.opcheck(
        torch.ops.pyfast.box_loss_backward.default,
        (grad, pred, target, weight, MODES["giou"], FORMATS["xyxy"], 1.0, 1.0, 1e-7, 2, None, True, True),
    )
    torch.library.opcheck(torch.ops.pyfast.box_iou.default, (pred, target, MODES["iou"], FORMATS["xyxy"], 1e-7))


def test_torch_compile_fullgraph():
    pred, target = _inputs(128, "xyxy", dtype=torch.float32, seed=13)

    def step(p, t):
        return pyfast.box_loss(p, t, mode="giou") + pyfast.box_iou(p, t).mean()

    compiled = torch.compile(step, fullgraph=True)
    p1 = pred.clone().requires_grad_()
    p2 = pred.clone().requires_grad_()
    compiled(p1, target).backward()
    step(p2, target).backward()
    torch.testing.assert_close(p1.grad, p2.grad)


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

    def test_weight_shape(self):
        with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
            pyfast.box_loss(self.pred, self.target, weight=torch.ones(7))

    @pytest.mark.parametrize("kw, name", [
        (dict(mode="sqiou"), "mode"), (dict(box_format="xywh"), "box_format"), (dict(reduction="max"), "reduction"),
    ])
    def test_unknown_choice(self, kw, name):
        with pytest.raises(ValueError, match=name):
            pyfast.box_loss(self.pred, self.target, **kw)

    @pytest.mark.parametrize("kw, name", [
        (dict(eps=-1.0), "eps"), (dict(avg_factor=0), "avg_factor"), (dict(l1_weight=math.nan), "l1_weight"),
    ])
    def test_bad_numbers(self, kw, name):
        with pytest.raises(ValueError, match=name):
            pyfast.box_loss(self.pred, self.target, **kw)

    def test_direct_op_call_is_validated(self):
        with pytest.raises(ValueError, match="target must have the shape of pred"):
            torch.ops.pyfast.box_loss_forward(self.pred, self.target[:3], None, 1, 0, 1.0, 1.0, 1e-7, 2, None)


def test_reference_backend_forced(monkeypatch):
    monkeypatch.setenv("PYFAST_BACKEND", "reference")
    _native.reload_backend_setting()
    try:
        pred, target = _inputs(16, "xyxy", dtype=torch.float32)
        p = pred.clone().requires_grad_()
        loss = pyfast.box_loss(p, target)
        # The reference path leaves its autograd graph of elementwise ops, not the fused Function.
        assert "BoxLossFunction" not in type(loss.grad_fn).__name__
    finally:
        monkeypatch.delenv("PYFAST_BACKEND")
        _native.reload_backend_setting()
    loss_native = pyfast.box_loss(pred.clone().requires_grad_(), target)
    assert "BoxLossFunction" in type(loss_native.grad_fn).__name__
    torch.testing.assert_close(loss, loss_native.detach(), rtol=1e-5, atol=0, check_dtype=True)


def test_missing_backend_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(_native, "native_available", lambda device_type: False)
    _native._warned.clear()
    pred, target = _inputs(16, "xyxy", dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="no native cpu backend"):
        first = pyfast.box_loss(pred, target)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pyfast.box_loss(pred, target)  # no second warning
    want = reference.box_loss_reference(pred, target)
    torch.testing.assert_close(first, want)
    _native._warned.clear()


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", list(MODES))
def test_cuda_matches_reference(mode, dtype):
    assert pyfast.native_available("cuda")
    pred, target = _inputs(70000, "xyxy", dtype=dtype, seed=14)
    for reduction in REDUCTIONS:
        got = _run(pyfast.box_loss, pred.cuda(), target.cuda(), mode=mode, reduction=reduction)
        want = _reference64(pred, target, mode=mode, reduction=reduction)
        tol = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-5)}.get(dtype, (1e-2, 1e-3))
        for a, b in zip(got, want):
            assert_close(a.cpu(), b, *tol)


@requires_cuda
def test_cuda_empty_nan_and_compile():
    empty = torch.zeros(0, 4, device="cuda", requires_grad=True)
    loss = pyfast.box_loss(empty, empty.detach())
    loss.backward()
    assert loss.item() == 0.0 and empty.grad.shape == (0, 4)
    names, pred, target = nasty_boxes()
    pred, target = pred.cuda().float(), target.cuda().float()
    assert torch.isfinite(pyfast.box_loss(pred, target, mode="ciou", reduction="none")).all()
    pred[0, 0] = math.nan
    assert torch.isnan(pyfast.box_loss(pred, target))
    compiled = torch.compile(lambda p, t: pyfast.box_loss(p, t), fullgraph=True)
    p = target.clone().requires_grad_()
    compiled(p, target).backward()
    assert torch.isfinite(p.grad).all()
