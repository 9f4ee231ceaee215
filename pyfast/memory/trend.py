"""Robust growth rates: the Theil–Sen slope with Sen's confidence interval, vectorised in numpy.

The slope is the median of the slopes of all pairs of points, so a spike (an outlier sample) or a
noisy stretch moves it little (breakdown point 29%). Its confidence interval comes from the ranks
of those pairwise slopes (Sen 1968, eq. 2.6, with the tie correction for repeated values), so it
needs no assumption about the noise. A window of n samples costs n(n-1)/2 slopes: 1,770 for 60.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np


@dataclass(frozen=True)
class SlopeFit:
    slope: float              # units per x unit
    intercept: float          # median of y - slope * x
    ci_low: float             # Sen's confidence interval of the slope
    ci_high: float
    positive_fraction: float  # share of pairwise slopes above zero


def _tie_term(values: np.ndarray) -> float:
    _, counts = np.unique(values, return_counts=True)
    counts = counts[counts > 1].astype(np.float64)
    return float(np.sum(counts * (counts - 1) * (2 * counts + 5)))


def pairwise_slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Slopes of every pair of points with distinct x (an n x n difference table, upper triangle)."""
    n = len(x)
    upper = np.triu(np.ones((n, n), dtype=bool), k=1)
    dx = (x[None, :] - x[:, None])[upper]
    dy = (y[None, :] - y[:, None])[upper]
    keep = dx != 0
    return dy[keep] / dx[keep]


def theil_sen(x, y, confidence: float = 0.95) -> SlopeFit:
    """Theil–Sen fit of y against x with a two-sided `confidence` interval of the slope.

    x, y: 1-D sequences of equal length with at least two distinct x values; NaN is not allowed
    (drop missing samples first).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"x and y must be 1-D of equal length, got shapes {x.shape} and {y.shape}")
    if not (0.0 < confidence < 1.0):
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("x and y must be finite (drop missing samples before fitting)")
    if y.size > 1 and np.all(y == y[0]) and np.unique(x).size > 1:
        return SlopeFit(0.0, float(y[0]), 0.0, 0.0, 0.0)  # a constant series (descriptors, mostly)
    slopes = np.sort(pairwise_slopes(x, y))
    count = slopes.size
    if count == 0:
        raise ValueError("theil_sen needs at least two points with distinct x")
    middle = count // 2
    slope = float(slopes[middle] if count % 2 else 0.5 * (slopes[middle - 1] + slopes[middle]))
    intercept = float(np.median(y - slope * x))

    n = len(y)
    x_ties = 0.0 if np.all(np.diff(x) > 0) else _tie_term(x)  # distinct steps: no ties in x
    variance = (n * (n - 1) * (2 * n + 5) - x_ties - _tie_term(y)) / 18.0
    spread = _z(confidence) * np.sqrt(max(variance, 0.0))
    # Ranks of the bounds among the sorted slopes (0-based), clipped into the array.
    low_rank = int(np.clip(np.round((count - spread) / 2.0) - 1, 0, count - 1))
    high_rank = int(np.clip(np.round((count + spread) / 2.0), 0, count - 1))
    above_zero = count - int(np.searchsorted(slopes, 0.0, side="right"))
    return SlopeFit(
        slope=slope,
        intercept=intercept,
        ci_low=float(slopes[low_rank]),
        ci_high=float(slopes[high_rank]),
        positive_fraction=above_zero / count,
    )


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)
