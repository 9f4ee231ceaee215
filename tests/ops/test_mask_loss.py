"""pyfast.mask_loss / mask_iou / MaskLoss against the float64 reference twin, on every test device."""

from __future__ import annotations

import math

import pytest
import torch

import pyfast
from pyfast import _native
from pyfast.ops import reference
from pyfast.ops.mask_loss import NUM_SUMS

from backends import pyfast_env
from conftest import assert_close, assert_second_backward_repeats

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
OPTIONS = dict(bce_weight=1.0, dice_weight=1.0, focal_weight=0.5, alpha=0.25, gamma=2.0, smooth=1.0)


def _targets(shape, kind, generator):
    soft = torch.rand(shape, generator=generator, dtype=torch.float64)
    if kind == "soft":
        return soft
    mask = soft > 0.6
    return mask if kind == "bool" else mask.to(torch.uint8)


def _inputs(shape, kind="bool", dtype=torch.float64, seed=0, scale=4.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    return logits.to(device), _targets(shape, kind, g).to(device)


def _run(fn, logits, targets, **kw):
    """Loss and the gradient w.r.t. logits of sum(loss * fixed cotangent)."""
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, targets, **kw)
    cot = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
    (loss * cot).sum().backward()
    return loss.detach(), x.grad


def _reference64(logits, targets, **kw):
    """The twin in float64 on the CPU, on the same (already rounded) inputs."""
    targets = targets.detach().cpu()
    if targets.is_floating_point():
        targets = targets.double()
    kw = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    return _run(reference.mask_loss_reference, logits.detach().cpu().double(), targets, **kw)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", TARGET_KINDS)
@pytest.mark.parametrize("terms", list(TERMS))
def test_float64_matches_reference(device, terms, kind, reduction):
    logits, targets = _inputs((9, 13, 11), kind, seed=1, device=device)
    got = _run(pyfast.mask_loss, logits, targets, reduction=reduction, **TERMS[terms])
    want = _reference64(logits, targets, reduction=reduction, **TERMS[terms])
    for a, b in zip(got, want):
        assert a.dtype == torch.float64
        assert_close(a, b, rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("kind", TARGET_KINDS)
@pytest.mark.parametrize("terms", list(TERMS))
def test_float32_matches_float64_reference(device, terms, kind):
    # 5 masks of 40000 elements: several CPU chunks and CUDA work items per mask.
    logits, targets = _inputs((5, 200, 200), kind, dtype=torch.float32, seed=2, device=device)
    loss, grad = _run(pyfast.mask_loss, logits, targets, reduction="none", **TERMS[terms])
    want_loss, want_grad = _reference64(logits, targets, reduction="none", **TERMS[terms])
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert_close(grad, want_grad, rtol=1e-4, atol=1e-5 * want_grad.abs().max().item())


@pytest.mark.parametrize("target_dtype", [torch.bool, torch.float32, "same"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_logits_loss_float32_grads_in_logits_dtype(device, dtype, target_dtype):
    logits, targets = _inputs((6, 32, 32), "soft", dtype=dtype, seed=3, device=device)
    targets = targets.to(dtype if target_dtype == "same" else target_dtype)
    kw = TERMS["combined"]
    loss, grad = _run(pyfast.mask_loss, logits, targets, reduction="none", **kw)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    # The kernel computes in float32 from the exact half values: only the gradient is rounded.
    want_loss, want_grad = _reference64(logits, targets, reduction="none", **kw)
    assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    eps = torch.finfo(dtype).eps
    assert_close(grad, want_grad, rtol=eps, atol=eps * want_grad.abs().max().item())


def test_float_targets_in_another_dtype_are_converted(device):
    logits, targets = _inputs((4, 50), "soft", dtype=torch.float32, seed=4, device=device)
    for t in (targets.half(), targets.double(), targets.bfloat16()):
        got = pyfast.mask_loss(logits, t, reduction="none")
        want = reference.mask_loss_reference(logits.cpu().double(), t.cpu().double(), reduction="none")
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
def test_nasty_masks_finite_and_match_reference(device, terms, dtype):
    x, t = _nasty()
    x, t = x.to(device, dtype), t.to(device)
    loss, grad = _run(pyfast.mask_loss, x, t, reduction="none", **TERMS[terms])
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    want_loss, want_grad = _reference64(x, t, reduction="none", **TERMS[terms])
    tol = {torch.float64: 1e-11, torch.float32: 1e-5}.get(dtype, 1e-2)
    assert_close(loss, want_loss, rtol=tol, atol=tol)
    assert_close(grad, want_grad, rtol=tol, atol=tol * 1e-2)


@pytest.mark.parametrize("terms", ["combined", "focal_gamma1.5_no_alpha", "focal_gamma0"])
def test_huge_logits_float32(device, terms):
    x, t = _nasty()
    x, t = (x.sign() * 1e4).float().to(device), t.to(device)
    loss, grad = _run(pyfast.mask_loss, x, t, reduction="none", **TERMS[terms])
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    want_loss, want_grad = _reference64(x, t, reduction="none", **TERMS[terms])
    assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(37,), (37, 1), (1, 1, 1)])
def test_one_element_masks(device, shape):
    logits, targets = _inputs(shape, "uint8", seed=5, device=device)
    got = _run(pyfast.mask_loss, logits, targets, reduction="none", **TERMS["combined"])
    want = _reference64(logits, targets, reduction="none", **TERMS["combined"])
    assert got[0].shape == (shape[0],)
    for a, b in zip(got, want):
        assert_close(a, b, rtol=1e-11, atol=1e-14)


def test_large_mask_float32(device):
    # One 4096 x 4096 mask: chunked over threads (CPU) or blocks (CUDA), partial sums in a fixed order.
    logits, targets = _inputs((1, 4096, 4096), "bool", dtype=torch.float32, seed=6, scale=8.0, device=device)
    loss, grad = _run(pyfast.mask_loss, logits, targets, **TERMS["combined"])
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    want_loss, want_grad = _reference64(logits, targets, **TERMS["combined"])
    assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert_close(grad, want_grad, rtol=1e-4, atol=1e-5 * want_grad.abs().max().item())


def test_known_values(device):
    # x = 0, t = 1, one element: ce = log 2, p = 1/2, dice = 1 - (1 + 1) / (0.5 + 1 + 1) = 0.2,
    # focal = (1/2)^2 * 0.25 * log 2.
    x = torch.zeros(1, 1, dtype=torch.float64, device=device)
    t = torch.ones(1, 1, dtype=torch.bool, device=device)
    assert pyfast.mask_loss(x, t, dice_weight=0.0).item() == pytest.approx(math.log(2), rel=1e-14)
    assert pyfast.mask_loss(x, t, bce_weight=0.0).item() == pytest.approx(0.2, rel=1e-14)
    focal = pyfast.mask_loss(x, t, bce_weight=0.0, dice_weight=0.0, focal_weight=1.0).item()
    assert focal == pytest.approx(0.25 * 0.25 * math.log(2), rel=1e-14)


@pytest.mark.parametrize("terms", list(TERMS))
@pytest.mark.parametrize("kind", ["bool", "soft"])
def test_gradcheck_native_float64(device, terms, kind):
    logits, targets = _inputs((3, 4, 5), kind, seed=7, scale=2.0, device=device)
    x = logits.clone().requires_grad_()
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda x: pyfast.mask_loss(x, targets, reduction=reduction, **TERMS[terms]), (x,)
        )


def test_op_itself_is_differentiable(device):
    logits, targets = _inputs((3, 4, 5), "soft", seed=7, scale=2.0, device=device)
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: torch.ops.pyfast.mask_loss_forward(x, targets, reduction="sum", avg_factor=None, **OPTIONS)[0],
        (x,),
    )


def test_avg_factor_number_and_tensor(device):
    logits, targets = _inputs((7, 10, 10), "bool", seed=8, device=device)
    total = _run(pyfast.mask_loss, logits, targets, reduction="sum")
    for avg in (3.5, torch.tensor(3.5, dtype=torch.float64, device=device)):
        got = _run(pyfast.mask_loss, logits, targets, reduction="mean", avg_factor=avg)
        assert_close(got[0], total[0] / 3.5, rtol=1e-14, atol=0)
        assert_close(got[1], total[1] / 3.5, rtol=1e-14, atol=0)
        want = _reference64(logits, targets, reduction="mean", avg_factor=avg)
        assert_close(got[0], want[0], rtol=1e-12, atol=0)
    # mean without avg_factor divides by N
    mean = _run(pyfast.mask_loss, logits, targets, reduction="mean")
    assert_close(mean[0], total[0] / 7, rtol=1e-14, atol=0)


class TestAvgFactor:
    x = torch.randn(4, 6, 6)
    t = torch.rand(4, 6, 6) > 0.5

    @pytest.mark.parametrize("value", [torch.tensor([2.0, 3.0]), torch.ones(2, 1), torch.tensor([])])
    def test_tensor_must_hold_one_element(self, value):
        with pytest.raises(ValueError, match="avg_factor"):
            pyfast.mask_loss(self.x, self.t, avg_factor=value)

    def test_zero_tensor_divides_by_eps_never_inf(self, device):
        x, t = self.x.to(device), self.t.to(device)
        loss = pyfast.mask_loss(x, t, avg_factor=torch.zeros((), device=device))
        assert torch.isfinite(loss)
        total = pyfast.mask_loss(x, t, reduction="sum")
        assert loss.item() == pytest.approx(total.item() / torch.finfo(torch.float32).eps, rel=1e-6)

    @pytest.mark.parametrize("reduction", ["sum", "none"])
    def test_only_with_mean(self, reduction):
        for value in (2.0, torch.tensor(2.0)):
            with pytest.raises(ValueError, match="avg_factor"):
                pyfast.mask_loss(self.x, self.t, reduction=reduction, avg_factor=value)


class TestFloatTargetsOutsideUnitRange:
    """0/255 float masks and negative targets have no valid loss: never a wrong number."""

    def _masks(self, device, dtype=torch.float32):
        logits, binary = _inputs((6, 9, 9), "bool", dtype=dtype, seed=24, device=device)
        return logits, binary

    @pytest.mark.parametrize("make", [lambda b: b.float() * 255, lambda b: b.float() - 0.5, lambda b: b.float() * 1.5])
    def test_cpu_raises_naming_targets_and_range(self, make):
        logits, binary = self._masks("cpu")
        targets = make(binary)
        with pytest.raises(ValueError, match=r"targets are float but outside \[0, 1\] \(min .*, max .*\).*uint8"):
            pyfast.mask_loss(logits, targets)
        with pytest.raises(ValueError, match="targets"):
            pyfast.mask_iou(logits, targets)
        with pytest.raises(ValueError, match="targets"):
            torch.ops.pyfast.mask_loss_forward(logits, targets, reduction="mean", avg_factor=None, **OPTIONS)

    def test_the_same_mask_as_bytes_works(self, device):
        logits, binary = self._masks(device)
        as_bytes = pyfast.mask_loss(logits, (binary.to(torch.uint8) * 255))
        assert_close(as_bytes, pyfast.mask_loss(logits, binary), rtol=0, atol=0)
        assert_close(as_bytes, pyfast.mask_loss(logits, binary.float()), rtol=1e-6, atol=0)
        iou = pyfast.mask_iou(logits, binary.to(torch.uint8) * 255)
        assert ((iou >= 0) & (iou <= 1)).all()

    def test_reference_fallback_raises_too(self):
        logits, binary = self._masks("cpu")
        with pyfast_env(backend="reference"):
            with pytest.raises(ValueError, match="targets"):
                pyfast.mask_loss(logits, binary.float() * 255)
            with pytest.raises(ValueError, match="targets"):
                pyfast.mask_iou(logits, binary.float() * 255)

    @pytest.mark.parametrize("backend", ["auto", "reference"])
    def test_poisoned_with_nan_where_raising_needs_a_sync(self, device, backend):
        # What the kernels do for such a mask (the CUDA default): its loss and IoU are NaN, the
        # others unchanged, so neither IoU > 1 nor a negative loss can come out.
        if device.type == "cpu":
            pytest.skip("the CPU ops raise (above)")
        logits, binary = self._masks(device)
        targets = binary.float()
        targets[2] *= 255
        targets[4] -= 0.5
        with pyfast_env(backend=backend):
            loss = pyfast.mask_loss(logits, targets, reduction="none")
            iou = pyfast.mask_iou(logits, targets)
            good = [0, 1, 3, 5]
            assert torch.isnan(loss[[2, 4]]).all() and torch.isnan(iou[[2, 4]]).all()
            assert_close(loss[good], pyfast.mask_loss(logits[good], binary[good], reduction="none"), 1e-6, 0)
            assert torch.isnan(pyfast.mask_loss(logits, targets))
            with pyfast_env(checked="1"):
                with pytest.raises(ValueError, match="targets.*in 2 of 6 masks"):
                    pyfast.mask_loss(logits, targets)
                with pytest.raises(ValueError, match="targets"):
                    pyfast.mask_iou(logits, targets)

    def test_kernel_math_poisons_the_mask(self):
        # The per-mask sums the kernels keep: the count of bad targets turns that mask's loss to NaN
        # (checked through the CPU kernel's sums, which the CUDA kernels share via mask_loss_math.h).
        logits, binary = self._masks("cpu")
        targets = binary.float()
        targets[1, 0, 0] = 2.0
        with pytest.raises(ValueError, match="in 1 of 6 masks"):
            torch.ops.pyfast.mask_loss_forward(logits, targets, reduction="none", avg_factor=None, **OPTIONS)
        want = reference.mask_loss_reference(logits.double(), targets.double(), reduction="none")
        assert torch.isnan(want[1]) and torch.isfinite(want[[0, 2, 3, 4, 5]]).all()
        sums = reference.mask_sums_reference(logits, targets)
        assert sums[:, reference.MASK_SUMS.index("bad_targets")].tolist() == [0, 1, 0, 0, 0, 0]


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(device, reduction):
    x = torch.zeros(0, 8, 8, device=device, requires_grad=True)
    loss = pyfast.mask_loss(x, torch.zeros(0, 8, 8, dtype=torch.bool, device=device), reduction=reduction)
    if reduction == "none":
        assert loss.shape == (0,)
        loss.sum().backward()
    else:
        assert loss.shape == () and loss.item() == 0.0
        loss.backward()
    assert x.grad.shape == (0, 8, 8)
    assert pyfast.mask_iou(x, torch.zeros(0, 8, 8, device=device)).shape == (0,)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_what_is_saved_for_backward(device, reduction):
    """Two passes keep only per-mask sums between them; the CPU's gradient in the forward (a reduced
    loss) keeps that gradient instead, the size of the logits, and nothing else."""
    logits, targets = _inputs((16, 64, 64), "bool", dtype=torch.float32, seed=9, device=device)
    x = logits.requires_grad_()
    extra = {}

    def pack(t):
        if t.data_ptr() not in (x.data_ptr(), targets.data_ptr()):
            extra[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        pyfast.mask_loss(x, targets, reduction=reduction)
    if device.type == "cpu" and reduction != "none":
        assert sum(extra.values()) == x.numel() * 4
    else:
        assert sum(extra.values()) == 16 * NUM_SUMS * 4  # O(N), not O(N * H * W)


@pytest.mark.parametrize("terms", ["bce", "dice", "focal", "focal_gamma1.5_no_alpha"])
def test_nan_logit_gives_nan_never_zero(device, terms):
    logits, targets = _inputs((4, 30), "bool", dtype=torch.float32, seed=10, device=device)
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


def test_non_contiguous_inputs(device):
    logits, targets = _inputs((6, 20, 30), "bool", seed=12, device=device)
    x, t = logits.transpose(1, 2), targets.transpose(1, 2)
    got = _run(pyfast.mask_loss, x, t, **TERMS["combined"])
    want = _reference64(x, t, **TERMS["combined"])
    for a, b in zip(got, want):
        assert_close(a, b, rtol=1e-11, atol=1e-14)


def test_mask_iou_matches_direct_computation(device):
    logits, targets = _inputs((10, 17, 19), "bool", dtype=torch.float32, seed=13, device=device)
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


def test_mask_iou_soft_targets_and_dtypes(device):
    logits, targets = _inputs((6, 40), "soft", seed=14, device=device)
    want = reference.mask_iou_reference(logits.cpu(), targets.cpu(), 0.5)
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        got = pyfast.mask_iou(logits.to(dtype), targets.to(dtype), 0.5)
        ref = reference.mask_iou_reference(logits.to(dtype).cpu(), targets.to(dtype).cpu(), 0.5)
        assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert_close(pyfast.mask_iou(logits, targets, 0.5), want, rtol=1e-14, atol=0)
    assert not pyfast.mask_iou(logits.requires_grad_(), targets).requires_grad


def test_mask_loss_module(device):
    logits, targets = _inputs((5, 12, 12), "bool", dtype=torch.float32, seed=25, device=device)
    loss_fn = pyfast.MaskLoss(dice_weight=0.5, focal_weight=1.0)
    assert isinstance(loss_fn, torch.nn.Module) and "focal_weight=1.0" in repr(loss_fn)
    kw = dict(dice_weight=0.5, focal_weight=1.0)
    assert torch.equal(loss_fn(logits, targets), pyfast.mask_loss(logits, targets, **kw))
    avg = torch.tensor(2.0, device=device)
    assert torch.equal(loss_fn(logits, targets, avg_factor=avg), pyfast.mask_loss(logits, targets, avg_factor=avg, **kw))
    weight = torch.rand(5, device=device)
    per_mask = pyfast.mask_loss(logits, targets, reduction="none", **kw)
    assert_close(loss_fn(logits, targets, weight), (per_mask * weight).mean(), rtol=1e-6, atol=0)
    assert_close(loss_fn(logits, targets, weight, avg_factor=avg), (per_mask * weight).sum() / 2, rtol=1e-6, atol=0)
    assert_close(pyfast.MaskLoss(reduction="none")(logits, targets, weight),
                 pyfast.mask_loss(logits, targets, reduction="none") * weight, rtol=1e-6, atol=0)  # fmt: skip
    with pytest.raises(ValueError, match="weight"):
        loss_fn(logits, targets, torch.ones(4, device=device))
    with pytest.raises(ValueError, match="reduction"):
        pyfast.MaskLoss(reduction="avg")


def test_opcheck(device):
    logits, targets = _inputs((5, 6, 7), "bool", dtype=torch.float32, seed=15, device=device)
    soft = targets.float() * 0.8
    forward = torch.ops.pyfast.mask_loss_forward.default
    other = dict(bce_weight=0.5, dice_weight=2.0, focal_weight=1.0, alpha=-1.0, gamma=1.5, smooth=0.5)
    for args, kwargs in (
        ((logits, targets), dict(OPTIONS, reduction="mean", avg_factor=None)),
        ((logits, targets.to(torch.uint8)), dict(other, reduction="none", avg_factor=None)),
        ((logits.double(), soft.double()), dict(OPTIONS, reduction="sum", avg_factor=None)),
        ((logits.half(), soft), dict(OPTIONS, reduction="mean", avg_factor=3.0)),
    ):
        torch.library.opcheck(forward, args, kwargs)
        torch.library.opcheck(forward, (args[0].clone().requires_grad_(), args[1]), kwargs)
    kw = dict(OPTIONS, reduction="mean", avg_factor=None)
    _, sums = forward(logits, targets, **kw)
    backward = torch.ops.pyfast.mask_loss_backward.default
    torch.library.opcheck(backward, (torch.tensor(1.0, device=device), logits, targets, sums), kw)
    torch.library.opcheck(backward, (torch.rand(5, device=device), logits, soft, sums), dict(kw, reduction="none"))
    torch.library.opcheck(torch.ops.pyfast.mask_iou.default, (logits, targets), dict(threshold=0.0))


def _two_pass_loss(x, t, **kw):
    """The loss through mask_loss_forward, whose backward recomputes from the logits."""
    return torch.ops.pyfast.mask_loss_forward(x, t, **kw)[0]


def _loss_and_grad(loss_fn, logits, targets, scale):
    x = logits.clone().requires_grad_()
    loss = loss_fn(x, targets)
    (loss * scale if scale != 1.0 else loss).backward()
    return loss.detach(), x.grad


@pytest.fixture
def two_threads():
    """Two torch threads: the one-pass path's routing depends on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("shape", [(7, 1000), (3, 200, 200), (0, 5)])
@pytest.mark.parametrize("kind", TARGET_KINDS)
def test_gradient_in_forward_matches_the_two_passes(shape, kind, two_threads):
    """On the CPU a reduced float32 loss without the focal term computes its gradient in the forward,
    each mask's two passes in cache: the same bits as the backward kernel for loss.backward(), a
    scaled copy for other grad_out. Masks of over one 16,384-element chunk, saturated and signed-zero
    logits, empty and full masks included."""
    logits, targets = _inputs(shape, kind, dtype=torch.float32, seed=30)
    if shape[0]:
        flat = logits.view(shape[0], -1)
        flat[0, :6] = torch.tensor([100.0, -100.0, 0.0, -0.0, 1e-30, -88.0])
        targets = targets.clone()
        targets.view(shape[0], -1)[1] = 0  # an empty target mask
        targets.view(shape[0], -1)[-1] = 1  # a full one
    targets = targets.float() if kind == "soft" else targets
    for reduction, avg_factor in (("mean", None), ("sum", None), ("mean", 5.0)):
        kw = dict(bce_weight=0.7, dice_weight=1.3, focal_weight=0.0, alpha=0.25, gamma=2.0, smooth=1.0,
                  reduction=reduction, avg_factor=avg_factor)  # fmt: skip
        fused = lambda x, t: pyfast.mask_loss(x, t, **kw)
        two_pass = lambda x, t: _two_pass_loss(x, t, **kw)
        x = logits.clone().requires_grad_()
        assert type(fused(x, targets).grad_fn).__name__ == "MaskLossForwardWithGradBackward"
        ours, theirs = _loss_and_grad(fused, logits, targets, 1.0), _loss_and_grad(two_pass, logits, targets, 1.0)
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
        ours, theirs = _loss_and_grad(fused, logits, targets, 0.375), _loss_and_grad(two_pass, logits, targets, 0.375)
        tol = 1e-6 * max(theirs[1].abs().max().item(), 1e-30) if theirs[1].numel() else 0.0
        torch.testing.assert_close(ours[1], theirs[1], rtol=1e-6, atol=tol)


def test_gradient_in_forward_only_where_it_pays():
    logits, targets = _inputs((3, 20, 20), "bool", dtype=torch.float32, seed=31)
    x = logits.clone().requires_grad_()
    name = lambda loss: type(loss.grad_fn).__name__
    assert name(pyfast.mask_loss(x, targets)) == "MaskLossForwardWithGradBackward"
    assert name(pyfast.mask_loss(x, targets, reduction="none")) == "MaskLossForwardBackward"
    assert name(pyfast.mask_loss(x, targets, focal_weight=1.0)) == "MaskLossForwardBackward"
    assert name(pyfast.mask_loss(x.double(), targets)) == "MaskLossForwardBackward"
    # One mask over a chunk: the two kernels split it between threads, the one-pass path would not.
    one, one_targets = _inputs((1, 200, 200), "bool", dtype=torch.float32, seed=35)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert name(pyfast.mask_loss(one.requires_grad_(), one_targets)) == "MaskLossForwardBackward"
        torch.set_num_threads(1)
        assert name(pyfast.mask_loss(one, one_targets)) == "MaskLossForwardWithGradBackward"
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        assert pyfast.mask_loss(x, targets).grad_fn is None
    with pyfast_env(backend="reference"):
        assert name(pyfast.mask_loss(x, targets)) == "MaskLossForwardBackward"


def test_gradient_in_forward_edge_cases():
    logits, targets = _inputs((4, 30, 30), "uint8", dtype=torch.float32, seed=32)
    x = logits.clone().requires_grad_()
    assert_second_backward_repeats(pyfast.mask_loss(x, targets), x)
    bad = logits.clone()
    bad[2, 3, 4] = math.nan
    x = bad.requires_grad_()
    loss = pyfast.mask_loss(x, targets)
    loss.backward()
    assert math.isnan(loss.item()) and torch.isnan(x.grad[2]).any() and torch.isfinite(x.grad[[0, 1, 3]]).all()
    with pytest.raises(ValueError, match="outside"):
        pyfast.mask_loss(logits.clone().requires_grad_(), targets.float() * 2)
    with pytest.raises(ValueError, match="reduction"):
        torch.ops.pyfast.mask_loss_forward_with_grad(logits, targets, **dict(OPTIONS, focal_weight=0.0),
                                                     reduction="none", avg_factor=None)  # fmt: skip


@pytest.mark.parametrize("dtype, focal_weight, m", [(torch.float64, 0.0, 900), (torch.float32, 1.0, 900),
                                                   (torch.float16, 0.0, 900), (torch.float32, 0.0, (1 << 18) + 3)])
def test_gradient_in_forward_op_runs_the_backward_kernel_where_its_loops_do_not_apply(dtype, focal_weight, m):
    """Called directly, the op takes any arguments its kernel takes: outside the fused loops' case
    (other dtypes, the focal term, masks over 2^18 elements) its one kernel call runs the forward
    and then the backward kernel, the two kernels' numbers bit for bit."""
    logits, targets = _inputs((3, m), "bool", dtype=dtype, seed=36)
    kw = dict(OPTIONS, focal_weight=focal_weight, reduction="mean", avg_factor=None)
    loss, grad = torch.ops.pyfast.mask_loss_forward_with_grad(logits, targets, **kw)
    want_loss, want_grad = _loss_and_grad(lambda x, t: _two_pass_loss(x, t, **kw), logits, targets, 1.0)
    assert torch.equal(loss, want_loss) and torch.equal(grad, want_grad)


def test_gradient_in_forward_falls_back_to_two_passes_and_to_the_reference():
    """The op is total: without the fused kernels (the portable CPU loops, the reference twin) it
    computes the same loss and gradient in two passes."""
    logits, targets = _inputs((5, 40, 40), "bool", dtype=torch.float32, seed=33)
    kw = dict(OPTIONS, focal_weight=0.0, reduction="mean", avg_factor=None)
    results = []
    for setting in ("fused", "generic", "reference"):
        _native._C._mask_loss_cpu_force_generic(setting == "generic")
        try:
            with pyfast_env(backend="reference" if setting == "reference" else "auto"):
                x = logits.clone().requires_grad_()
                loss, grad = torch.ops.pyfast.mask_loss_forward_with_grad(x, targets, **kw)
                (3.0 * loss).backward()
                results.append((loss.detach(), grad, x.grad))
        finally:
            _native._C._mask_loss_cpu_force_generic(False)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    assert torch.equal(results[0][2], 3.0 * results[0][1])


def test_gradient_in_forward_opcheck_and_compile():
    logits, targets = _inputs((5, 6, 7), "bool", dtype=torch.float32, seed=34)
    op = torch.ops.pyfast.mask_loss_forward_with_grad.default
    kw = dict(OPTIONS, focal_weight=0.0, reduction="mean", avg_factor=None)
    for t in (targets, targets.to(torch.uint8), targets.float() * 0.8):
        torch.library.opcheck(op, (logits, t), kw)
        torch.library.opcheck(op, (logits.clone().requires_grad_(), t), kw)
    step = lambda x, t: pyfast.mask_loss(x, t) * 2.0
    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    out1, out2 = torch.compile(step, fullgraph=True)(x1, targets), step(x2, targets)
    out1.backward()
    out2.backward()
    torch.testing.assert_close(out1, out2)
    torch.testing.assert_close(x1.grad, x2.grad)


def test_torch_compile_fullgraph(device):
    logits, targets = _inputs((4, 16, 16), "bool", dtype=torch.float32, seed=16, device=device)
    module = pyfast.MaskLoss(focal_weight=0.5)

    def step(x, t):
        return pyfast.mask_loss(x, t, focal_weight=1.0) + pyfast.mask_iou(x, t).mean() + module(x, t)

    compiled = torch.compile(step, fullgraph=True)
    x1 = logits.clone().requires_grad_()
    x2 = logits.clone().requires_grad_()
    out1, out2 = compiled(x1, targets), step(x2, targets)
    out1.backward()
    out2.backward()
    torch.testing.assert_close(out1, out2)
    torch.testing.assert_close(x1.grad, x2.grad)


def test_double_backward_raises_naming_the_op(device):
    logits, targets = _inputs((3, 5, 5), "soft", seed=26, device=device)
    x = logits.clone().requires_grad_()
    (g,) = torch.autograd.grad(pyfast.mask_loss(x, targets, focal_weight=1.0), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"pyfast\.mask_loss has no second derivative"):
        torch.autograd.grad(g.sum(), x)


def test_focal_mode_choice():
    # The kernels compile the focal term in three shapes; the choice is the native module's.
    _C = _native._C

    def choose(**changes):
        return _C.mask_focal_mode(_C.MaskLossOptions(**{**OPTIONS, **changes}))

    assert choose(focal_weight=0.0) == _C.MaskFocal.none
    assert choose(focal_weight=1.0, gamma=2.0) == _C.MaskFocal.gamma2
    assert choose(focal_weight=1.0, gamma=0.5) == _C.MaskFocal.general


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
        with pytest.raises(ValueError, match="targets"):
            torch.ops.pyfast.mask_loss_forward(self.x.clone().requires_grad_(), self.x.clone().requires_grad_(),
                                               reduction="mean", avg_factor=None, **OPTIONS)  # fmt: skip

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
            torch.ops.pyfast.mask_loss_forward(self.x.long(), self.t, reduction="mean", avg_factor=None, **OPTIONS)
        with pytest.raises(ValueError, match="sums"):
            torch.ops.pyfast.mask_loss_backward(torch.tensor(1.0), self.x, self.t, torch.zeros(3, 5),
                                                reduction="mean", avg_factor=None, **OPTIONS)  # fmt: skip


def test_reference_backend_forced(device):
    logits, targets = _inputs((3, 8), "bool", seed=17, device=device)
    calls = []
    real = reference.mask_loss_reference
    with pytest.MonkeyPatch.context() as mp, pyfast_env(backend="reference"):
        mp.setattr(reference, "mask_loss_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
        got = _run(pyfast.mask_loss, logits, targets, **TERMS["combined"])
        assert len(calls) == 2  # the forward and the backward kernel
    want = _run(pyfast.mask_loss, logits, targets, **TERMS["combined"])
    assert_close(got[0], want[0], rtol=1e-12, atol=0)
    assert_close(got[1], want[1], rtol=1e-10, atol=1e-14)
