import math

import pytest
import torch

from pyfast.models.roi_align import roi_align


def _bilinear(fmap, y, x):
    """Direct bilinear sample of one (C, H, W) map, Mask R-CNN boundary rules."""
    c, h, w = fmap.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return torch.zeros(c, dtype=torch.float64)
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    f = fmap.double()
    return (
        f[:, y0, x0] * (1 - ly) * (1 - lx)
        + f[:, y0, x1] * (1 - ly) * lx
        + f[:, y1, x0] * ly * (1 - lx)
        + f[:, y1, x1] * ly * lx
    )


def _direct(features, rois, out, scale, sr):
    result = torch.zeros(len(rois), features.shape[1], out, out, dtype=torch.float64)
    for n, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        x1, y1, x2, y2 = x1 * scale - 0.5, y1 * scale - 0.5, x2 * scale - 0.5, y2 * scale - 0.5
        bw, bh = (x2 - x1) / out, (y2 - y1) / out
        for py in range(out):
            for px in range(out):
                acc = 0
                for iy in range(sr):
                    for ix in range(sr):
                        y = y1 + py * bh + (iy + 0.5) * bh / sr
                        x = x1 + px * bw + (ix + 0.5) * bw / sr
                        acc = acc + _bilinear(features[int(b)], y, x)
                result[n, :, py, px] = acc / (sr * sr)
    return result


@pytest.mark.parametrize("scale,sr", [(1.0, 1), (0.25, 2), (0.5, 3)])
def test_matches_direct_computation(scale, sr):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 9, 11, generator=g)
    rois = torch.tensor(
        [
            [0, 1.0, 2.0, 20.0, 30.0],
            [1, -6.0, -3.0, 12.0, 8.0],  # partly outside the map
            [1, 30.0, 25.0, 60.0, 50.0],  # reaches past the far edges
            [0, 5.0, 5.0, 5.5, 5.2],  # tiny
            [1, -20.0, -20.0, -10.0, -12.0],  # fully outside: zeros
        ]
    )
    got = roi_align(features, rois, 4, spatial_scale=scale, sampling_ratio=sr)
    want = _direct(features, rois, 4, scale, sr)
    assert got.shape == (5, 3, 4, 4)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_linear_map_gives_bin_centres():
    h = w = 16
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    fmap = (2.0 * xs + 3.0 * ys + 1.0)[None, None]
    rois = torch.tensor([[0, 2.0, 3.0, 10.0, 13.0]])  # pixel coords, scale 1, inside the map
    out = roi_align(fmap, rois, 5, spatial_scale=1.0, sampling_ratio=2)[0, 0]
    # aligned: pixel centres sit at integer + 0.5 → feature coordinate = box coordinate - 0.5
    cy = 3.0 - 0.5 + (torch.arange(5).float() + 0.5) * (10.0 / 5)
    cx = 2.0 - 0.5 + (torch.arange(5).float() + 0.5) * (8.0 / 5)
    want = 2.0 * cx[None, :] + 3.0 * cy[:, None] + 1.0
    torch.testing.assert_close(out, want)


def test_gradient_and_dtype_and_empty():
    features = torch.randn(1, 2, 8, 8, requires_grad=True)
    rois = torch.tensor([[0, 0.0, 0.0, 16.0, 16.0]])
    out = roi_align(features, rois, 3, spatial_scale=0.5)
    out.sum().backward()
    assert features.grad is not None and features.grad.abs().sum() > 0
    half = roi_align(features.detach().bfloat16(), rois, 3, spatial_scale=0.5)
    assert half.dtype == torch.bfloat16
    assert roi_align(features, torch.zeros(0, 5), 3).shape == (0, 2, 3, 3)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="features"):
        roi_align(torch.zeros(2, 8, 8), torch.zeros(1, 5), 2)
    with pytest.raises(ValueError, match="rois"):
        roi_align(torch.zeros(1, 2, 8, 8), torch.zeros(1, 4), 2)
