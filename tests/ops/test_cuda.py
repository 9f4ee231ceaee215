"""What only the CUDA path has: streams, devices, alignment, grid limits and 64-bit sizes.

The op suite at large runs on CUDA through the `device` fixture; these are the cases around it.
Tests named `test_huge_*` need several GB of GPU memory (they skip without it) and are left out of
the compute-sanitizer pass in scripts/gpu_check.sh, which would take hours on them.
"""

from __future__ import annotations

import math

import pytest
import torch

import pyfast
from pyfast.ops import reference
from pyfast.ops.pack import pack_buffers

from boxes import random_boxes
from conftest import assert_close
from packs import assert_packs_like_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _boxes(n, dtype=torch.float32, device="cuda"):
    pred, target = random_boxes(n, generator=torch.Generator().manual_seed(n))
    return pred.to(device, dtype), target.to(device, dtype)


def _masks(shape, dtype=torch.float32, kind="bool", device="cuda", seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(device, dtype)
    soft = torch.rand(shape, generator=g, dtype=torch.float64)
    targets = {"bool": soft > 0.6, "uint8": (soft > 0.6).to(torch.uint8), "soft": soft.to(dtype)}[kind]
    return logits, targets.to(device)


def _grad(fn, x, *args, **kw):
    x = x.detach().clone().requires_grad_()
    loss = fn(x, *args, **kw)
    loss.sum().backward()
    return loss.detach(), x.grad


def _free_memory_gb() -> float:
    return torch.cuda.mem_get_info()[0] / 2**30


def _late_copy(src: torch.Tensor) -> torch.Tensor:
    """A copy of src written on the current stream after the GPU spins for a while: a kernel that ran
    on another stream without waiting would read the zeros it starts as."""
    dst = torch.zeros_like(src)
    torch.cuda._sleep(50_000_000)
    dst.copy_(src)
    return dst


def test_every_op_runs_on_the_current_non_default_stream():
    pred, target = _boxes(5000)
    logits, targets = _masks((6, 33, 35))
    want_box = _grad(pyfast.box_loss, pred, target, reduction="none")
    want_mask = _grad(pyfast.mask_loss, logits, targets, reduction="none")
    want_iou = pyfast.mask_iou(logits, targets)
    want_pack = pack_buffers([logits, pred], torch.float16, True)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        got_box = _grad(pyfast.box_loss, _late_copy(pred), target, reduction="none")
        got_mask = _grad(pyfast.mask_loss, _late_copy(logits), targets, reduction="none")
        got_iou = pyfast.mask_iou(_late_copy(logits), targets)
        got_pack = pack_buffers([_late_copy(logits), pred], torch.float16, True)
    side.synchronize()
    for got, want in ((got_box, want_box), (got_mask, want_mask), ((got_iou,), (want_iou,)), (got_pack, want_pack)):
        for a, b in zip(got, want):
            assert torch.equal(a, b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_a_device_other_than_the_current_one():
    torch.cuda.set_device(0)
    pred, target = _boxes(3000, device="cuda:1")
    logits, targets = _masks((4, 50, 50), device="cuda:1")
    loss, grad = _grad(pyfast.box_loss, pred, target, reduction="none")
    want = _grad(reference.box_loss_reference, pred.cpu().double(), target.cpu().double(), reduction="none")
    assert loss.device == torch.device("cuda:1") and grad.device == torch.device("cuda:1")
    assert_close(loss, want[0], 1e-5, 1e-5)
    assert_close(grad, want[1], 1e-4, 1e-5)
    loss, grad = _grad(pyfast.mask_loss, logits, targets, reduction="none")
    want = _grad(reference.mask_loss_reference, logits.cpu().double(), targets.cpu(), reduction="none")
    assert_close(loss, want[0], 1e-5, 1e-6)
    assert_close(grad, want[1], 1e-4, 1e-7)
    assert_close(pyfast.mask_iou(logits, targets), reference.mask_iou_reference(logits.cpu(), targets.cpu()), 1e-6, 0)
    packed = pack_buffers([logits, pred], torch.bfloat16, False)
    assert packed[0].device == torch.device("cuda:1")
    assert torch.equal(packed[0].cpu(), torch.cat([logits.reshape(-1), pred.reshape(-1)]).bfloat16().cpu())
    assert torch.cuda.current_device() == 0  # the kernels' device guard put it back


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_box_views_that_start_mid_box(dtype):
    # The kernels load a box as one vector: a view one element into a buffer is not box-aligned.
    pred, target = _boxes(1000, dtype)
    flat = torch.empty(4 * 1000 + 1, dtype=dtype, device="cuda")
    flat[1:] = pred.reshape(-1)
    view = flat[1:].view(1000, 4)
    assert view.data_ptr() % (4 * view.element_size()) != 0
    got = _grad(pyfast.box_loss, view, target, reduction="none", mode="ciou")
    want = _grad(pyfast.box_loss, pred, target, reduction="none", mode="ciou")
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["bool", "uint8", "soft"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mask_views_off_the_vector_alignment(dtype, kind):
    base, targets = _masks((4 * 64 + 1,), dtype, kind, seed=1)
    x = base[1:].view(4, 64)  # one element past an aligned address
    t = targets[1:].view(4, 64)
    loss, grad = _grad(pyfast.mask_loss, x, t, reduction="none", focal_weight=1.0)
    want = _grad(reference.mask_loss_reference, x.cpu().double(),
                 t.cpu().double() if t.is_floating_point() else t.cpu(), reduction="none", focal_weight=1.0)  # fmt: skip
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close(loss, want[0], tol, 1e-6)
    assert_close(grad, want[1], tol, tol * want[1].abs().max().item())


@pytest.mark.parametrize("shape", [(5, 13, 7), (3, 1001), (7, 8, 9)])
@pytest.mark.parametrize("kind", ["bool", "soft"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_masks_whose_size_is_not_a_multiple_of_8(dtype, kind, shape):
    # 16-bit logits load 8 to a vector; these masks take the scalar path (and a mix of both).
    logits, targets = _masks(shape, dtype, kind, seed=2)
    for terms in (dict(), dict(focal_weight=1.0, gamma=1.5, alpha=-1.0)):
        loss, grad = _grad(pyfast.mask_loss, logits, targets, reduction="none", **terms)
        t = targets.cpu().double() if targets.is_floating_point() else targets.cpu()
        want = _grad(reference.mask_loss_reference, logits.cpu().double(), t, reduction="none", **terms)
        assert_close(loss, want[0], 1e-5, 1e-6)
        eps = torch.finfo(dtype).eps
        assert_close(grad, want[1], eps, eps * want[1].abs().max().item())
    assert_close(pyfast.mask_iou(logits, targets, 0.3), reference.mask_iou_reference(logits.cpu(), targets.cpu(), 0.3),
                 1e-6, 0)  # fmt: skip


def test_pack_more_items_than_grid_rows():
    # 70,000 items: more than the 65,535 rows a CUDA grid can have in y.
    g = torch.Generator().manual_seed(3)
    sizes = torch.randint(1, 9, (70_000,), generator=g).tolist()
    flat = torch.randn(sum(sizes), generator=g) * 3e4
    flat[::997] = math.inf
    flat[5::1009] = math.nan
    tensors = list(flat.cuda().split(sizes))
    assert_packs_like_reference(tensors)


def test_pack_one_large_tensor_among_many_small():
    g = torch.Generator().manual_seed(4)
    small = [torch.randn(int(n), generator=g) for n in torch.randint(1, 50, (3000,), generator=g)]
    large = torch.randn(1 << 22, generator=g, dtype=torch.float64) * 1e5
    large[-1] = math.nan
    tensors = [t.cuda() for t in small[:1500] + [large] + small[1500:]]
    assert_packs_like_reference(tensors)
    assert_packs_like_reference(tensors, torch.bfloat16, False)


def test_huge_masks_beyond_2_to_the_31_elements():
    # Two float32 masks of 2^30 + 16 elements: indices past 2^31 in every kernel. Closed-form
    # expectations (all logits 0; mask 0 all foreground, mask 1 all background).
    m = (1 << 30) + 16
    if _free_memory_gb() < 2 * m * 9 / 2**30 + 2:
        pytest.skip("needs ~20 GB of free GPU memory")
    logits = torch.zeros(2, m, device="cuda", requires_grad=True)
    targets = torch.zeros(2, m, dtype=torch.bool, device="cuda")
    targets[0] = True
    loss = pyfast.mask_loss(logits, targets)
    loss.backward()
    num0, den0 = m + 1.0, 1.5 * m + 1.0  # dice of mask 0: S_pt = S_p = m/2, S_t = m, smooth 1
    num1, den1 = 1.0, 0.5 * m + 1.0
    want = 0.5 * ((math.log(2) + 1 - num0 / den0) + (math.log(2) + 1 - num1 / den1))
    assert loss.item() == pytest.approx(want, rel=1e-4)
    grad0 = 0.5 * (-0.5 / m + 0.25 * (num0 / den0**2 - 2 / den0))
    grad1 = 0.5 * (0.5 / m + 0.25 * (num1 / den1**2))
    for row, want_grad in ((0, grad0), (1, grad1)):
        for col in (0, m - 1):
            assert logits.grad[row, col].item() == pytest.approx(want_grad, rel=1e-3)
    iou = pyfast.mask_iou(logits.detach(), targets, threshold=-1.0)
    assert iou.tolist() == [1.0, 0.0]


def test_huge_pack_beyond_2_to_the_31_elements():
    n = (1 << 31) + 7
    if _free_memory_gb() < n * 6 / 2**30 + 2:
        pytest.skip("needs ~14 GB of free GPU memory")
    x = torch.zeros(n, device="cuda")
    x[-3:] = torch.tensor([3.0, math.nan, 1e6], device="cuda")
    buffer, counts, absmax = pack_buffers([x], torch.float16, False)
    assert counts.tolist() == [[1, 1]] and absmax.item() == 1e6
    tail = buffer[-3:].float().cpu()
    assert tail[0] == 3.0 and math.isnan(tail[1]) and tail[2] == math.inf
