"""Bilinear RoIAlign in plain torch ops (no torchvision).

Semantics follow Mask R-CNN's RoIAlign with `aligned=True` (the half-pixel offset) and a fixed
sampling ratio: each output bin averages `sampling_ratio x sampling_ratio` bilinear samples taken
at the centres of a regular sub-grid of the bin. A sample more than one pixel outside the map
contributes 0; one within a pixel of the border is clamped onto it.

Everything is gathered at once (four corner gathers over an (N, out_h*sr, out_w*sr) grid), so the
cost is a handful of kernels regardless of the number of boxes.
"""

from __future__ import annotations

import torch


def _axis(start: torch.Tensor, length: torch.Tensor, out: int, sr: int, size: int):
    """Sample positions along one axis: low/high indices, their weights (zeroed outside), (N, out*sr)."""
    steps = torch.arange(out * sr, device=start.device, dtype=start.dtype)
    pos = start[:, None] + (steps[None, :] + 0.5) * (length[:, None] / (out * sr))
    valid = (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0.0)
    low = pos.floor().clamp(max=size - 1)
    at_edge = low >= size - 1
    high = torch.where(at_edge, low, low + 1)
    pos = torch.where(at_edge, low, pos)
    frac = pos - low
    w_low = (1.0 - frac) * valid
    w_high = frac * valid
    return low.long(), high.long(), w_low, w_high


def roi_align(
    features: torch.Tensor,
    rois: torch.Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = 2,
    aligned: bool = True,
) -> torch.Tensor:
    """Pool `features` (B, C, H, W) over `rois` (N, 5) = [batch_index, x1, y1, x2, y2] → (N, C, oh, ow).

    Box coordinates are in input pixels; `spatial_scale` maps them onto the feature map
    (1 / stride). The result has the dtype of `features`; sampling math runs in float32.
    """
    if features.dim() != 4:
        raise ValueError(f"features must have shape (B, C, H, W), got {tuple(features.shape)}")
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must have shape (N, 5), got {tuple(rois.shape)}")
    if rois.device != features.device:
        raise ValueError(f"rois are on {rois.device}, features on {features.device}")
    if sampling_ratio < 1:
        raise ValueError(f"sampling_ratio must be >= 1, got {sampling_ratio}")
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    b, c, h, w = features.shape
    n = rois.shape[0]
    if n == 0:
        return features.new_zeros((0, c, oh, ow))

    r = rois.detach().float()
    offset = 0.5 if aligned else 0.0
    x1 = r[:, 1] * spatial_scale - offset
    y1 = r[:, 2] * spatial_scale - offset
    rw = r[:, 3] * spatial_scale - offset - x1
    rh = r[:, 4] * spatial_scale - offset - y1
    if not aligned:
        rw, rh = rw.clamp(min=1.0), rh.clamp(min=1.0)
    sr = sampling_ratio
    ylo, yhi, wylo, wyhi = _axis(y1, rh, oh, sr, h)
    xlo, xhi, wxlo, wxhi = _axis(x1, rw, ow, sr, w)

    flat = features.permute(0, 2, 3, 1).reshape(b * h * w, c)
    base = (r[:, 0].long() * (h * w))[:, None, None]

    def corner(yi, xi):
        idx = base + yi[:, :, None] * w + xi[:, None, :]
        return flat.index_select(0, idx.reshape(-1)).view(n, oh * sr, ow * sr, c)

    dt = features.dtype
    out = (
        corner(ylo, xlo) * (wylo[:, :, None] * wxlo[:, None, :]).to(dt)[..., None]
        + corner(ylo, xhi) * (wylo[:, :, None] * wxhi[:, None, :]).to(dt)[..., None]
        + corner(yhi, xlo) * (wyhi[:, :, None] * wxlo[:, None, :]).to(dt)[..., None]
        + corner(yhi, xhi) * (wyhi[:, :, None] * wxhi[:, None, :]).to(dt)[..., None]
    )
    out = out.view(n, oh, sr, ow, sr, c).mean(dim=(2, 4))
    return out.permute(0, 3, 1, 2).contiguous()
