"""Checks of a pack against the reference twin, for the CPU and the CUDA pack tests."""

from __future__ import annotations

import torch

from pyfast.ops.pack import pack_buffers
from pyfast.ops.reference import pack_reference


def assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal bit patterns; NaNs only need to be NaN in both (payloads may differ)."""
    got, want = got.cpu(), want.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape
    got_nan, want_nan = torch.isnan(got.float()), torch.isnan(want.float())
    assert torch.equal(got_nan, want_nan)
    assert torch.equal(got.view(torch.int16)[~got_nan], want.view(torch.int16)[~want_nan])


def assert_same_pack(got, want) -> None:
    """Two (buffer, counts, absmax) packs: the buffers bit for bit, the statistics equal."""
    assert_same_bits(got[0], want[0])
    assert torch.equal(got[1].cpu(), want[1].cpu())
    assert torch.equal(got[2].cpu(), want[2].cpu())


def assert_packs_like_reference(tensors, dtype=torch.float16, saturate=True) -> None:
    """pack_buffers(tensors) gives the reference twin's pack."""
    want = pack_reference([t.cpu() for t in tensors], dtype=dtype, saturate=saturate)
    assert_same_pack(pack_buffers(tensors, dtype, saturate), want)
