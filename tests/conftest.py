"""Shared test helpers. Tests run against the installed pyfast (the README's `pytest`)."""

from __future__ import annotations

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def assert_close(actual, expected, rtol, atol):
    """Compare in float64, whatever the dtypes."""
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)
