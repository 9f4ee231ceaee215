"""Box generators for the tests: fresh random boxes and the cases that break naive code."""

from __future__ import annotations

import torch


def random_boxes(n: int, *, generator: torch.Generator | None = None, scale: float = 100.0):
    """Valid xyxy pred/target pairs with realistic overlap (targets jittered from preds)."""
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * scale
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) * scale * 0.5 + scale * 0.01
    target = torch.cat([xy, xy + wh], 1)
    pred = target + torch.randn(n, 4, generator=generator, dtype=torch.float64) * scale * 0.05
    return pred, target


def nasty_boxes():
    """Named (pred, target) float64 pairs: zero-size, inverted, identical, disjoint, touching, huge, tiny."""
    rows = {
        "zero_size_both": ([5, 5, 5, 5], [5, 5, 5, 5]),
        "zero_size_pred": ([3, 3, 3, 7], [2, 2, 8, 8]),
        "zero_width_target": ([1, 1, 4, 4], [2, 0, 2, 6]),
        "inverted_pred": ([6, 6, 2, 2], [2, 2, 6, 6]),
        "inverted_both": ([6, 6, 2, 2], [9, 9, 1, 1]),
        "identical": ([1.5, 2.5, 7.0, 9.0], [1.5, 2.5, 7.0, 9.0]),
        "disjoint": ([0, 0, 1, 1], [10, 10, 12, 12]),
        "touching_edge": ([0, 0, 2, 2], [2, 0, 4, 2]),
        "touching_corner": ([0, 0, 2, 2], [2, 2, 4, 4]),
        "contained": ([2, 2, 3, 3], [0, 0, 10, 10]),
        "huge_1e4": ([1.0e4, 2.0e4, 3.5e4, 4.0e4], [1.2e4, 1.9e4, 3.0e4, 4.1e4]),
        "huge_disjoint": ([0, 0, 1.0e4, 1.0e4], [3.0e4, 3.0e4, 4.0e4, 4.0e4]),
        "one_pixel": ([10, 10, 11, 11], [10, 10, 11, 11]),
        "one_pixel_shifted": ([10, 10, 11, 11], [10.5, 10, 11.5, 11]),
        "same_centre": ([0, 0, 4, 2], [1, -1, 3, 3]),
    }
    pred = torch.tensor([p for p, _ in rows.values()], dtype=torch.float64)
    target = torch.tensor([t for _, t in rows.values()], dtype=torch.float64)
    return list(rows), pred, target
