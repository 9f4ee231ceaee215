"""Shared test helpers. Tests run against the installed pyfast (the README's `pytest`).

`device`: every test that takes it runs once per device in PYFAST_TEST_DEVICES (comma-separated,
e.g. `PYFAST_TEST_DEVICES=cuda pytest tests/ops`), by default cpu plus cuda when torch sees a GPU.
Asking for a device that is not there is an error, not a skip: a GPU run that quietly tested
nothing on the GPU would pass.
"""

from __future__ import annotations

import os

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _available(name: str) -> bool:
    kind = torch.device(name).type
    if kind == "cpu":
        return True
    module = getattr(torch, kind, None)
    return bool(module is not None and hasattr(module, "is_available") and module.is_available())


def devices_to_test() -> list[str]:
    setting = os.environ.get("PYFAST_TEST_DEVICES", "").strip()
    if not setting:
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [name.strip() for name in setting.split(",") if name.strip()]


DEVICES = devices_to_test()


def pytest_configure(config):
    missing = [name for name in DEVICES if not _available(name)]
    if missing:
        raise pytest.UsageError(f"PYFAST_TEST_DEVICES asks for {', '.join(missing)}, which torch cannot use here")


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def assert_close(actual, expected, rtol, atol):
    """Compare in float64 on the CPU, whatever the dtypes and devices."""
    torch.testing.assert_close(actual.detach().cpu().double(), expected.detach().cpu().double(), rtol=rtol, atol=atol)


def assert_second_backward_repeats(loss, leaf):
    """retain_graph: a second backward adds the same gradient to leaf.grad again (the first one did
    not consume what the graph saved)."""
    loss.backward(retain_graph=True)
    first = leaf.grad.clone()
    loss.backward()
    assert torch.equal(leaf.grad, 2 * first)
