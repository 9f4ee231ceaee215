"""The CUDA pack beyond the per-device op suite: one flat tile space over items of every size and
alignment, and capture in a CUDA graph (the items travel as kernel parameters, nothing is uploaded
per call).
"""

from __future__ import annotations

import math

import pytest
import torch

from pyfast.ops.pack import pack_buffers

from conftest import requires_cuda
from packs import assert_packs_like_reference, assert_same_pack

pytestmark = requires_cuda


def _values(n, generator, dtype=torch.float32, scale=3e4):
    x = torch.randn(n, generator=generator, dtype=torch.float64) * scale
    x[::997] = math.inf
    x[5::1009] = math.nan
    x[7::1013] = 1e6  # overflows float16
    return x.to(dtype)


def _misaligned_view(n, offset, dtype, generator):
    """n elements starting `offset` elements into a fresh CUDA buffer (not 16-byte aligned)."""
    base = _values(n + offset, generator, dtype).cuda()
    return base[offset:]


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("saturate", [True, False])
def test_one_large_item_among_many_small_of_every_dtype_and_alignment(out_dtype, saturate):
    g = torch.Generator().manual_seed(11)
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
    tensors = []
    for i, n in enumerate(torch.randint(1, 70, (2000,), generator=g).tolist()):
        dtype = dtypes[i % 4]
        tensors.append(_misaligned_view(n, i % 5, dtype, g) if i % 3 == 0 else _values(n, g, dtype).cuda())
    large = _values((1 << 22) + 3, g, torch.float32).cuda()
    tensors.insert(700, large)  # its output offset is not a multiple of 8: a scalar head, then vectors
    tensors.insert(1300, _misaligned_view((1 << 20) + 1, 1, torch.float32, g))  # source and output phases differ
    tensors.insert(1500, _misaligned_view((1 << 20), 2, torch.float16, g))
    tensors.insert(10, torch.empty(0, device="cuda"))  # items without elements have no tiles
    assert_packs_like_reference(tensors, out_dtype, saturate)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 8191, 8192, 8193, 3 * 8192 + 5])
@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_tile_edges(n, offset, dtype):
    # Items of about one tile (8192 elements), at every phase of the output and the source.
    g = torch.Generator().manual_seed(n + offset)
    tensors = [_values(offset + 1, g, dtype).cuda(), _misaligned_view(n, offset, dtype, g), _values(n, g, dtype).cuda()]
    assert_packs_like_reference(tensors)


def test_capture_in_a_cuda_graph_replays_like_eager():
    g = torch.Generator().manual_seed(12)
    sizes = [1 << 20, 3, 1000, 77, 4096]
    tensors = [_values(n, g).cuda() for n in sizes] + [_values(5000, g, torch.float64).cuda()]
    many = [_values(n, g).cuda() for n in torch.randint(1, 30, (3000,), generator=g).tolist()]  # several launches
    for inputs in (tensors, many):
        eager = pack_buffers(inputs, torch.float16, True)
        side = torch.cuda.Stream()  # warm up outside the capture, as torch.cuda.graph recommends
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            pack_buffers(inputs, torch.float16, True)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = pack_buffers(inputs, torch.float16, True)
        graph.replay()
        torch.cuda.synchronize()
        assert_same_pack(captured, eager)
        # A replay reads the inputs' current values, from the same addresses.
        for t in inputs:
            t.mul_(-0.5)
        graph.replay()
        torch.cuda.synchronize()
        assert_same_pack(captured, pack_buffers(inputs, torch.float16, True))
