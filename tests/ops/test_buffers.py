"""pyfast/ops/_buffers.py: large CPU outputs reuse the pages of released ones, never of live ones."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

import pyfast
from pyfast.ops import _buffers, reference

LARGE = _buffers.MIN_BYTES // 2  # float16 elements of a pooled request


@pytest.fixture(autouse=True)
def empty_pool():
    _buffers.release()
    yield
    _buffers.release()


def test_a_released_buffer_is_reused_and_a_live_one_never():
    first = _buffers.empty(LARGE, torch.float16)
    address = first.data_ptr()
    second = _buffers.empty(LARGE, torch.float16)
    assert second.data_ptr() != address  # `first` is alive
    view = first[100:]
    del first
    third = _buffers.empty(LARGE, torch.float16)
    assert third.data_ptr() not in (address, second.data_ptr())  # a view keeps it alive too
    del view
    fourth = _buffers.empty(LARGE, torch.float16)
    assert fourth.data_ptr() == address
    assert fourth.shape == (LARGE,) and fourth.dtype == torch.float16


def test_a_larger_free_buffer_serves_a_smaller_request_within_a_factor_of_two():
    big = _buffers.empty(LARGE, torch.float32)
    address = big.data_ptr()
    del big
    smaller = _buffers.empty(LARGE * 3 // 4, torch.float32)
    assert smaller.data_ptr() == address and smaller.numel() == LARGE * 3 // 4
    del smaller
    assert _buffers.empty(LARGE // 4, torch.float32).data_ptr() != address  # under half: a new one


def test_small_requests_and_other_devices_bypass_the_pool():
    small = _buffers.empty(16, torch.float32)
    assert small.shape == (16,) and _buffers.pooled_bytes() == 0
    meta = _buffers.empty_like(torch.empty(LARGE, 4, device="meta"))
    assert meta.device.type == "meta" and meta.shape == (LARGE, 4)


def test_the_pool_stays_within_its_bound(monkeypatch):
    monkeypatch.setattr(_buffers, "MAX_BYTES", 3 * _buffers.MIN_BYTES)
    held = [_buffers.empty(LARGE, torch.float16) for _ in range(6)]
    assert _buffers.pooled_bytes() <= 3 * _buffers.MIN_BYTES
    held[0].fill_(1.0)  # dropped from the pool, still the tensor's own memory
    assert held[0].float().sum().item() == LARGE
    del held
    assert _buffers.release() > 0 and _buffers.pooled_bytes() == 0


def test_pack_outputs_come_back_correct_from_reused_pages():
    tensors = {"a": torch.randn(LARGE) * 100, "b": torch.randn(LARGE // 3)}
    packed = pyfast.pack(tensors)
    address = packed.buffer.data_ptr()
    del packed
    packed = pyfast.pack(tensors)
    assert packed.buffer.data_ptr() == address
    expected, _, _ = reference.pack_reference(list(tensors.values()), dtype=torch.float16, saturate=False)
    assert torch.equal(packed.buffer, expected)


@pytest.mark.parametrize("gradient_in_forward", [True, False])
def test_box_gradients_from_the_pool_match_the_reference(gradient_in_forward):
    g = torch.Generator().manual_seed(3)
    n = _buffers.MIN_BYTES // 16 + 7  # float32 gradients of over MIN_BYTES
    xy = torch.rand(n, 2, generator=g) * 100
    target = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 50 + 1], 1)
    pred = target + torch.randn(n, 4, generator=g)
    results = []
    addresses = []
    for _ in range(2):  # the second round's gradient lands on the first's released pages
        p = pred.clone().requires_grad_()
        loss = pyfast.box_loss(p, target) if gradient_in_forward else pyfast.box_loss(p, target, reduction="none").sum()
        (grad,) = torch.autograd.grad(loss, p)
        addresses.append(grad.data_ptr())
        results.append(grad.clone())
        del grad, loss
    p = pred.double().requires_grad_()
    want = reference.box_loss_reference(p, target.double(), mode="giou", box_format="xyxy", l1_weight=1.0,
                                        iou_weight=1.0, eps=1e-7, reduction="mean" if gradient_in_forward else "sum")
    (want,) = torch.autograd.grad(want, p)
    assert addresses[0] == addresses[1] and torch.equal(results[0], results[1])
    torch.testing.assert_close(results[1].double(), want, rtol=1e-4, atol=1e-6 * want.abs().max().item())


def test_a_child_forked_while_the_lock_is_held_can_still_allocate():
    with _buffers._lock:
        pid = os.fork()
        if pid == 0:  # the child: its copy of the lock was taken at fork time
            code = 3
            try:
                code = 0 if _buffers.empty(LARGE, torch.float16).numel() == LARGE else 4
            finally:
                os._exit(code)
    for _ in range(300):  # a child stuck on the lock would never exit: give it 30 s
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung on the pool's lock")
    assert os.waitstatus_to_exitcode(status) == 0
