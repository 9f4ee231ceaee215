"""Plain calls: pyfast's own calls of its ops skip the dispatcher only where it would pass straight
through to a native kernel (pyfast/ops/_library.py); everything else still goes through it."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import pyfast
from pyfast.ops._library import call_keys, plain_route

from backends import pyfast_env


class RecordOps(TorchDispatchMode):
    """Records the name of every op the dispatcher hands to Python modes."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _boxes(n=64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 100
    pred = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 50 + 1], 1)
    return pred.to(device), (pred + torch.randn(n, 4, generator=g)).to(device)


def test_routes_of_plain_calls(device):
    x = torch.zeros(3, device=device)
    assert plain_route(call_keys((x, None, x))) == "autograd"
    with torch._C._AutoDispatchBelowAutograd():
        assert plain_route(call_keys((x,))) == "native"
    with torch.inference_mode():
        assert plain_route(call_keys((torch.zeros(3, device=device),))) == "native"
    if device.type != "cpu":  # one call on two devices: the dispatcher's business
        assert plain_route(call_keys((x, torch.zeros(3)))) is None


@pytest.mark.parametrize("case", ["dispatch mode", "fake tensor", "autocast", "meta tensor", "cpu and meta"])
def test_every_other_call_goes_through_the_dispatcher(case):
    x = torch.zeros(3)
    if case == "dispatch mode":
        with RecordOps():
            assert plain_route(call_keys((x,))) is None
    elif case == "fake tensor":
        with FakeTensorMode() as mode:
            fake = mode.from_tensor(x)
        assert plain_route(call_keys((fake,))) is None
    elif case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert plain_route(call_keys((x,))) is None
    elif case == "meta tensor":
        assert plain_route(call_keys((x.to("meta"),))) is None
    else:
        assert plain_route(call_keys((x, x.to("meta")))) is None


def test_no_plain_route_without_native_kernels():
    x = torch.zeros(3)
    with pyfast_env(backend="reference"):
        assert plain_route(call_keys((x,))) is None
    assert plain_route(call_keys((x,))) == "autograd"


def test_modes_still_see_every_op_of_a_step(device):
    pred, target = _boxes(device=device)
    logits = torch.randn(4, 8, 8, device=device, requires_grad=True)
    masks = torch.rand(4, 8, 8, device=device) > 0.5
    with RecordOps() as mode:
        pyfast.box_loss(pred.clone().requires_grad_(), target).backward()
        pyfast.mask_loss(logits, masks).backward()
        pyfast.mask_iou(logits, masks)
    ops = [name for name in mode.ops if name.startswith("pyfast.")]
    # On the CPU the losses compute their gradients in the forward (one op each); elsewhere two.
    if device.type == "cpu":
        losses = ["pyfast.box_loss_forward_with_grad.default", "pyfast.mask_loss_forward_with_grad.default"]
    else:
        losses = ["pyfast.box_loss_forward.default", "pyfast.box_loss_backward.default",
                  "pyfast.mask_loss_forward.default", "pyfast.mask_loss_backward.default"]  # fmt: skip
    assert ops == losses + ["pyfast.mask_iou.default"]


@pytest.mark.parametrize("mode", ["iou", "giou", "diou", "ciou"])
@pytest.mark.parametrize("weight_grad", [True, False])
def test_plain_and_dispatched_calls_agree_bitwise(device, mode, weight_grad):
    pred, target = _boxes(257, seed=1, device=device)
    weight = torch.rand(257, 4, device=device)
    results = []
    for through_dispatcher in (False, True):
        p, t = pred.clone().requires_grad_(), target.clone().requires_grad_()
        w = weight.clone().requires_grad_(weight_grad)
        if through_dispatcher:
            with RecordOps():
                loss = pyfast.box_loss(p, t, mode=mode, weight=w, reduction="sum")
                loss.backward()
        else:
            loss = pyfast.box_loss(p, t, mode=mode, weight=w, reduction="sum")
            loss.backward()
        results.append((loss.detach(), p.grad, t.grad, w.grad))
    for plain, dispatched in zip(*results):
        assert torch.equal(plain, dispatched) if plain is not None else dispatched is None


def test_plain_calls_keep_the_first_order_only_rule(device):
    pred, target = _boxes(16, seed=2, device=device)
    p = pred.clone().requires_grad_()
    (grad,) = torch.autograd.grad(pyfast.box_loss(p, target), p, create_graph=True)
    with pytest.raises(RuntimeError, match="pyfast.box_loss has no second derivative"):
        grad.sum().backward()
