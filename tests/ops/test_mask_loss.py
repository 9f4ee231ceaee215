"""pyfast.mask_loss / mask_iou against the float64 reference twin, plus the contract's edge cases."""

from __future__ import annotations

import math

import pytest
import torch

import pyfast
from pyfast import _native
from pyfast.ops import reference
from pyfast.ops.mask_loss import _FOCAL_GAMMA2, _NUM_SUMS

from conftest import assert_close, requires_cuda

REDUCTIONS = ["none", "sum", "mean"]
TARGET_KINDS = ["bool", "uint8", "soft"]
# Each term alone, the focal term's variants, and everything together.
TERMS = {
    "bce": dict(bce_weight=1.0, dice_weight=0.0),
    "dice": dict(bce_weight=0.0, dice_weight=1.0, smooth=0.5),
    "focal": dict(bce_weight=0.0, dice_weight=0.0, focal_weight=1.0),
    "focal_gamma1.5_no_alpha": dict(bce_weight=0.0, dice_weight=0.0, focal_weight=1.0, alpha=-1.0, gamma=1.5),
    "focal_gamma0": dict(bce_weight=0.0, dice_weight=0.0, focal_weight=1.0, gamma=0.0),
    "combined": dict(bce_weight=0.7, dice_weight=1.3, focal_weight=2.0, alpha=0.3, gamma=2.0),
}


def _targets(shape, kind, generator):
    soft = torch.rand(shape, generator=generator, dtype=torch.float64)
    if kind == "soft":
        return soft
    mask = soft > 0.6
    return mask if kind == "bool" else mask.to(torch.uint8)


def _inputs(shape, kind="bool", dtype=torch.float64, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    return logits, _targets(shape, kind, g)


def _run(fn, logits, targets, **kw):
    """Loss and the gradient w.r.t. logits of sum(loss * fixed cotangent)."""
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, targets, **kw)
    cot = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    (loss * cot).sum().backward()
    return loss.detach(), x.grad


def _reference64(logits, targets, **kw):
    if targets.is_floating_point():
        targets = targets.double()
    return _run(reference.mask_loss_reference, logits.double(), targets, **kw)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", TARGET_KINDS)
@pytest.mark.parametrize("terms", list(TERMS))
def test_float64_matches_reference(terms, kind, reduction):
    logits, targets = _inputs((9, 13, 11), kind, seed=1)
    got = _run(pyfast.mask_loss, logits, targets, reduction=reduction, **TERMS[terms])
    want = _reference64(logits, targets, reduction=reduction, **TERMS[terms])
    for a, b in zip(got, want):
        assert a.dtype == torch.float64
        assert_close(a, b, rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("kind", TARGET_KINDS)
@pytest.mark.parametrize("terms", list(TERMS))
def test_float32_matches_float64_reference(terms, kind):
    # 5 masks of 40000 elements: several CPU chunks per mask.
    logits, targets = _inputs((5, 200, 200), kind, dtype=torch.float32, seed=2)
    loss, grad = _run(pyfast.mask_loss, logits, targets, reduction="none", **TERMS[terms])
    want_loss, want_grad = _reference64(logits, targets, reduction="none", **TERMS[terms])
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert_close(grad, want_grad, rtol=1e-4, atol=1e-5 * want_grad.abs().max().item())


@pytest.mark.parametrize("target_dtype", [torch.bool, torch.float32, "same"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_logits_loss_float32_grads_in_logits_dtype(dtype, target_dtype):
    logits, targets = _inputs((6, 32, 32), "soft", dtype=dtype, seed=3)
    targets = targets.to(dtype if target_dtype == "same" else target_dtype)
    kw = TERMS["combined"]
    loss, grad = _run(pyfast.mask_loss, logits, targets, reduction="none", **kw)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    # The kernel computes in float32 from the exact half values: only the gradient is rounded.
    want_loss, want_grad = _reference64(logits, targets, reduction="none", **kw)
    assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    eps = torch.finfo(dtype).eps
    assert_close(grad, want_grad, rtol=eps, atol=eps * want_grad.abs().max().item())


def test_float_targets_in_another_dtype_are_converted():
    logits, targets = _inputs((4, 50), "soft", dtype=torch.float32, seed=4)
    for t in (targets.half(), targets.double(), targets.bfloat16()):
        got = pyfast.mask_loss(logits, t, reduction="none")
        want = reference.mask_loss_reference(logits.double(), t.double(), reduction="none")
        assert_close(got, want, rtol=1e-5, atol=1e-6)


def _nasty():
    """Masks (rows of 64) that break naive implementations, and their names."""
    x = torch.randn(8, 64, dtype=torch.float64)
    t = (torch.rand(8, 64) > 0.5).double()
    x[0], t[0] = 80.0, 1.0  # saturated and right
    x[1], t[1] = 80.0, 0.0  # saturated and wrong
    x[2], t[2] = -80.0, 0.0
    x[3], t[3] = -80.0, 1.0
    t[4] = 0.0  # empty mask
    t[5] = 1.0  # full mask
    x[6] = torch.where(torch.arange(64) % 2 == 0, 80.0, -80.0)  # mixed saturation
    x[7], t[7] = 0.0, 0.5  # soft target at the decision boundary
    return x, t


@pytest.mark.parametrize("terms", list(TERMS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_nasty_masks_finite_and_match_reference(terms, dtype):
    x, t = _nasty()
    x = x.to(dtype)
    loss, grad = _run(pyfast.mask_loss, x, t, reduction="none", **TERMS[terms])
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    want_loss, want_grad = _reference64(x, t, reduction="none", **TERMS[terms])
    tol = {torch.float64: 1e-11, torch.float32: 1e-5}.get(dtype, 1e-2)
    assert_close(loss, want_loss, rtol=tol, atol=tol)
    assert_close(grad, want_grad, rtol=tol, atol=tol * 1e-2)


@pytest.mark.parametrize("terms", ["combined", "focal_gamma1.5_no_alpha", "focal_gamma0"])
def test_huge_logits_float32(terms):
    x, t = _nasty()
    x = (x.sign() * 1e4).float()
    loss, grad = _run(pyfast.mask_loss, x, t, reduction="none", **TERMS[terms])
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    want_loss, want_grad = _reference64(x, t, reduction="none", **TERMS[terms])
    assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(37,), (37, 1), (1, 1, 1)])
def test_one_element_masks(shape):
    logits, targets = _inputs(shape, "uint8", seed=5)
    got = _run(pyfast.mask_loss, logits, targets, reduction="none", **TERMS["combined"])
    want = _reference64(logits, targets, reduction="none", **TERMS["combined"])
    assert got[0].shape == (shape[0],)
    for a, b in zip(got, want):
        assert_close(a, b, rtol=1e-11, atol=1e-14)


def test_large_mask_float32():
    # One 4096 x 4096 mask: chunked over threads, accumulated per chunk in double.
    logits, targets = _inputs((1, 4096, 4096), "bool", dtype=torch.float32, seed=6, scale=8.0)
    loss, grad = _run(pyfast.mask_loss, logits, targets, **TERMS["combined"])
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    want_loss, want_grad = _reference64(logits, targets, **TERMS["combined"])
    assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert_close(grad, want_grad, rtol=1e-4, atol=1e-5 * want_grad.abs().max().item())


def test_known_values():
    # x = 0, t = 1, one element: ce = log 2, p = 1/2, dice = 1 - (1 + 1) / (0.5 + 1 + 1) = 0.2,
    # focal = (1/2)^2 * 0.25 * log 2.
    x, t = torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool)
    assert pyfast.mask_loss(x, t, dice_weight=0.0).item() == pytest.approx(math.log(2), rel=1e-14)
    assert pyfast.mask_loss(x, t, bce_weight=0.0).item() == pytest.approx(0.2, rel=1e-14)
    focal = pyfast.mask_loss(x, t, bce_weight=0.0, dice_weight=0.0, focal_weight=1.0).item()
    assert focal == pytest.approx(0.25 * 0.25 * math.log(2), rel=1e-14)


@pytest.mark.parametrize("terms", list(TERMS))
@pytest.mark.parametrize("kind", ["bool", "soft"])
def test_gradcheck_native_float64(terms, kind):
    logits, targets = _inputs((3, 4, 5), kind, seed=7, scale=2.0)
    x = logits.clone().requires_grad_()
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda x: pyfast.mask_loss(x, targets, reduction=reduction, **TERMS[terms]), (x,)
        )


def test_avg_factor_number_and_tensor():
    logits, targets = _inputs((7, 10, 10), "bool", seed=8)
    total = _run(pyfast.mask_loss, logits, targets, reduction="sum")
    for avg in (3.5, torch.tensor(3.5, dtype=torch.float64)):
        got = _run(pyfast.mask_loss, logits, targets, reduction="mean", avg_factor=avg)
        assert_close(got[0], total[0] / 3.5, rtol=1e-14, atol=0)
        assert_close(got[1], total[1] / 3.5, rtol=1e-14, atol=0)
        want = _reference64(logits, targets, reduction="mean", avg_factor=avg)
        assert_close(got[0], want[0], rtol=1e-12, atol=0)
    # mean without avg_factor divides by N
    mean = _run(pyfast.mask_loss, logits, targets, reduction="mean")
    assert_close(mean[0], total[0] / 7, rtol=1e-14, atol=0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(reduction):
    x = torch.zeros(0, 8, 8, requires_grad=True)
    loss = pyfast.mask_loss(x, torch.zeros(0, 8, 8, dtype=torch.bool), reduction=reduction)
    if reduction == "none":
        assert loss.shape == (0,)
        loss.sum().backward()
    else:
        assert loss.shape == () and loss.item() == 0.0
        loss.backward()
    assert x.grad.shape == (0, 8, 8)
    assert pyfast.mask_iou(x, torch.zeros(0, 8, 8)).shape == (0,)


def test_only_per_mask_sums_are_saved_for_backward():
    logits, targets = _inputs((16, 64, 64), "bool", dtype=torch.float32, seed=9)
    x = logits.requires_grad_()
    extra = {}

    def pack(t):
        if t.data_ptr() not in (x.data_ptr(), targets.data_ptr()):
            extra[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        pyfast.mask_loss(x, targets)
    assert sum(extra.values()) == 16 * _NUM_SUMS * 4  # O(N), not O(N * H * W)


@pytest.mark.parametrize("terms", ["bce", "dice", "focal", "focal_gamma1.5_no_alpha"])
def test_nan_logit_gives_nan_never_zero(terms):
    logits, targets = _inputs((4, 30), "bool", dtype=torch.float32, seed=10)
    logits[2, 7] = math.nan
    loss, grad = _run(pyfast.mask_loss, logits, targets, reduction="none", **TERMS[terms])
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3]]).all()
    assert torch.isnan(grad[2]).any() and torch.isfinite(grad[[0, 1, 3]]).all()
    assert torch.isnan(pyfast.mask_loss(logits, targets, **TERMS[terms]))
    assert torch.isnan(pyfast.mask_iou(logits, targets)[2])


def test_results_independent_of_thread_count():
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for shape in ((3, 70000), (5000, 7)):
                logits, targets = _inputs(shape, "soft", dtype=torch.float32, seed=11)
                results.append(_run(pyfast.mask_loss, logits, targets, **TERMS["combined"]))
    finally:
        torch.set_num_threads(previous)
    for other in results[2:]:
        base = results[0] if other[1].shape == results[0][1].shape else results[1]
        assert torch.equal(other[0], base[0]) and torch.equal(other[1], base[1])


def test_non_contiguous_inputs():
    logits, targets = _inputs((6, 20, 30), "bool", seed=12)
    x, t = logits.transpose(1, 2), targets.transpose(1, 2)
    got = _run(pyfast.mask_loss, x, t, **TERMS["combined"])
    want = _reference64(x, t, **TERMS["combined"])
    for a, b in zip(got, want):
        assert_close(a, b, rtol=1e-11, atol=1e-14)


def test_mask_iou_matches_direct_computation():
    logits, targets = _inputs((10, 17, 19), "bool", dtype=torch.float32, seed=13)
    targets[3] = False  # empty target
    logits[4] = -5.0  # empty prediction
    logits[5], targets[5] = -5.0, False  # both empty: IoU 0
    for threshold in (0.0, 1.5):
        pred = logits > threshold
        inter = (pred & targets).flatten(1).sum(1).float()
        union = (pred | targets).flatten(1).sum(1).float()
        want = inter / union.clamp(min=1)
        got = pyfast.mask_iou(logits, targets, threshold)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(pyfast.mask_iou(logits, targets.to(torch.uint8), threshold), want)
    assert pyfast.mask_iou(logits, targets)[5] == 0.0


def test_mask_iou_soft_targets_and_dtypes():
    logits, targets = _inputs((6, 40), "soft", seed=14)
    want = reference.mask_iou_reference(logits, targets, 0.5)
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        got = pyfast.mask_iou(logits.to(dtype), targets.to(dtype), 0.5)
        ref = reference.mask_iou_reference(logits.to(dtype), targets.to(dtype), 0.5)
        assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert_close(pyfast.mask_iou(logits, targets, 0.5), want, rtol=1e-14, atol=0)
    assert not pyfast.mask_iou(logits.requires_grad_(), targets).requires_grad


def test_opcheck():
    logits, targets = _inputs((5, 6, 7), "bool", dtype=torch.float32, seed=15)
    soft = targets.float() * 0.8
    params = (1.0, 1.0, 0.5, 0.25, 2.0, 1.0)
    for args in (
        (logits, targets, *params, 2, None),
        (logits, targets.to(torch.uint8), 0.5, 2.0, 1.0, -1.0, 1.5, 0.5, 0, None),
        (logits.double(), soft.double(), *params, 1, None),
        (logits.half(), soft, *params, 2, 3.0),
    ):
        torch.library.opcheck(torch.ops.pyfast.mask_loss_forward.default, args)
    _, sums = torch.ops.pyfast.mask_loss_forward(logits, targets, *params, 2, None)
    torch.library.opcheck(
        torch.ops.pyfast.mask_loss_backward.default, (torch.tensor(1.0), logits, targets, sums, *params, 2, None)
    )
    torch.library.opcheck(
        torch.ops.pyfast.mask_loss_backward.default, (torch.rand(5), logits, soft, sums, *params, 0, None)
    )
    torch.library.opcheck(torch.ops.pyfast.mask_iou.default, (logits, targets, 0.0))


def test_torch_compile_fullgraph():
    logits, targets = _inputs((4, 16, 16), "bool", dtype=torch.float32, seed=16)

    def step(x, t):
        return pyfast.mask_loss(x, t, focal_weight=1.0) + pyfast.mask_iou(x, t).mean()

    compiled = torch.compile(step, fullgraph=True)
    x1 = logits.clone().requires_grad_()
    x2 = logits.clone().requires_grad_()
    out1, out2 = compiled(x1, targets), step(x2, targets)
    out1.backward()
    out2.backward()
    torch.testing.assert_close(out1, out2)
    torch.testing.assert_close(x1.grad, x2.grad)


def test_focal_mode_choice():
    from pyfast.ops.mask_loss import _FOCAL_GENERAL, _NO_FOCAL, _focal_mode

    assert _focal_mode(0.0, 2.0) == _NO_FOCAL
    assert _focal_mode(1.0, 2.0) == _FOCAL_GAMMA2
    assert _focal_mode(1.0, 0.5) == _FOCAL_GENERAL


class TestBadInput:
    x = torch.zeros(2, 3, 3)
    t = torch.zeros(2, 3, 3, dtype=torch.bool)

    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="logits"):
            pyfast.mask_loss([[0.0]], self.t)
        with pytest.raises(TypeError, match="targets"):
            pyfast.mask_loss(self.x, [[0.0]])

    def test_integer_logits(self):
        with pytest.raises(TypeError, match="logits"):
            pyfast.mask_loss(self.x.long(), self.t)

    @pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.complex64])
    def test_bad_target_dtype(self, dtype):
        with pytest.raises(TypeError, match="targets"):
            pyfast.mask_loss(self.x, self.t.to(dtype))

    def test_shape_mismatch(self):
        with pytest.raises(ValueError, match="targets"):
            pyfast.mask_loss(self.x, self.t[:, :2])
        with pytest.raises(ValueError, match="targets"):
            pyfast.mask_iou(self.x, self.t[:1])

    def test_zero_d_and_empty_masks(self):
        with pytest.raises(ValueError, match="logits"):
            pyfast.mask_loss(torch.tensor(0.0), torch.tensor(True))
        with pytest.raises(ValueError, match="at least one element"):
            pyfast.mask_loss(torch.zeros(3, 0), torch.zeros(3, 0))

    def test_different_devices(self):
        with pytest.raises(ValueError, match="targets"):
            pyfast.mask_loss(self.x, self.t.to("meta"))

    def test_targets_requiring_grad(self):
        with pytest.raises(ValueError, match="targets"):
            pyfast.mask_loss(self.x, self.x.clone().requires_grad_())

    @pytest.mark.parametrize(
        "kw, name",
        [
            (dict(alpha=1.5), "alpha"),
            (dict(gamma=-1.0), "gamma"),
            (dict(smooth=0.0), "smooth"),
            (dict(bce_weight=math.nan), "bce_weight"),
            (dict(dice_weight="1"), "dice_weight"),
            (dict(focal_weight=math.inf), "focal_weight"),
            (dict(reduction="avg"), "reduction"),
            (dict(avg_factor=0.0), "avg_factor"),
        ],
    )
    def test_bad_numbers(self, kw, name):
        with pytest.raises((TypeError, ValueError), match=name):
            pyfast.mask_loss(self.x, self.t, **kw)

    def test_direct_op_call_is_validated(self):
        with pytest.raises(TypeError, match="logits"):
            torch.ops.pyfast.mask_loss_forward(self.x.long(), self.t, 1.0, 1.0, 0.0, 0.25, 2.0, 1.0, 2, None)
        with pytest.raises(ValueError, match="sums"):
            torch.ops.pyfast.mask_loss_backward(
                torch.tensor(1.0), self.x, self.t, torch.zeros(3, 5), 1.0, 1.0, 0.0, 0.25, 2.0, 1.0, 2, None
            )


def test_reference_backend_forced(monkeypatch):
    logits, targets = _inputs((3, 8), "bool", seed=17)
    monkeypatch.setenv("PYFAST_BACKEND", "reference")
    _native.reload_backend_setting()
    try:
        got = pyfast.mask_loss(logits, targets, **TERMS["combined"])
    finally:
        monkeypatch.delenv("PYFAST_BACKEND")
        _native.reload_backend_setting()
    want = pyfast.mask_loss(logits, targets, **TERMS["combined"])
    assert_close(got, want, rtol=1e-12, atol=0)


@requires_cuda
@pytest.mark.parametrize("kind", TARGET_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_matches_reference(dtype, kind):
    assert pyfast.native_available("cuda")
    # 3 x 20000 (several chunks, vector loads) and 7 x 13 x 11 (odd mask size: scalar loads).
    for shape in ((3, 100, 200), (7, 13, 11)):
        logits, targets = _inputs(shape, kind, dtype=dtype, seed=18)
        for terms in ("combined", "focal_gamma1.5_no_alpha", "dice"):
            for reduction in REDUCTIONS:
                got = _run(pyfast.mask_loss, logits.cuda(), targets.cuda(), reduction=reduction, **TERMS[terms])
                want = _reference64(logits, targets, reduction=reduction, **TERMS[terms])
                tol = {torch.float64: 1e-11, torch.float32: 1e-5}.get(dtype, 1e-2)
                assert_close(got[0].cpu(), want[0], rtol=tol, atol=tol)
                assert_close(got[1].cpu(), want[1], rtol=tol, atol=tol * want[1].abs().max().item())
        got_iou = pyfast.mask_iou(logits.cuda(), targets.cuda(), 0.5).cpu()
        assert_close(got_iou, reference.mask_iou_reference(logits, targets, 0.5), rtol=1e-5, atol=1e-6)


@requires_cuda
def test_cuda_unaligned_empty_nan_and_compile():
    base, targets = _inputs((4 * 64 + 1,), "bool", dtype=torch.float32, seed=19)
    x = base.cuda()[1:].view(4, 64)  # starts 4 bytes past an aligned address
    t = targets.cuda()[1:].view(4, 64)
    got = pyfast.mask_loss(x, t, reduction="none")
    assert_close(got.cpu(), reference.mask_loss_reference(x.cpu().double(), t.cpu(), reduction="none"), 1e-5, 1e-6)
    empty = torch.zeros(0, 8, device="cuda", requires_grad=True)
    loss = pyfast.mask_loss(empty, torch.zeros(0, 8, device="cuda"))
    loss.backward()
    assert loss.item() == 0.0 and empty.grad.shape == (0, 8)
    big = torch.full((1, 4096, 4096), 80.0, device="cuda", requires_grad=True)
    loss = pyfast.mask_loss(big, torch.zeros(1, 4096, 4096, dtype=torch.bool, device="cuda"), focal_weight=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(big.grad).all()
    x = x.clone()
    x[1, 3] = math.nan
    assert torch.isnan(pyfast.mask_loss(x, t))
    compiled = torch.compile(lambda a, b: pyfast.mask_loss(a, b, focal_weight=1.0), fullgraph=True)
    p = x.clone().nan_to_num_().requires_grad_()
    compiled(p, t).backward()
    assert torch.isfinite(p.grad).all()
