import itertools
import statistics

import numpy as np
import pytest

from pyfast.memory.trend import theil_sen


def reference_slopes(x, y):
    """Every pairwise slope, one pair at a time, in float64."""
    return [(y[j] - y[i]) / (x[j] - x[i]) for i, j in itertools.combinations(range(len(x)), 2) if x[j] != x[i]]


@pytest.mark.parametrize("seed", range(5))
def test_slope_intercept_and_positive_fraction_match_the_pairwise_definition(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 70))
    x = np.sort(rng.choice(5000, size=n, replace=False)).astype(float)
    y = rng.normal(0, 3, n) + 0.01 * x
    y[rng.integers(0, n, 3)] = np.round(y[0])  # some ties in y
    fit = theil_sen(x, y)
    slopes = reference_slopes(x, y)
    assert fit.slope == pytest.approx(statistics.median(slopes), rel=1e-12, abs=1e-15)
    assert fit.intercept == pytest.approx(statistics.median(y - fit.slope * x), rel=1e-12, abs=1e-12)
    assert fit.positive_fraction == pytest.approx(sum(s > 0 for s in slopes) / len(slopes))
    assert fit.ci_low <= fit.slope <= fit.ci_high


def test_repeated_x_pairs_are_skipped():
    x = np.array([0.0, 0.0, 1.0, 2.0, 2.0, 3.0])
    y = np.array([0.0, 5.0, 1.0, 2.0, -7.0, 3.0])
    assert theil_sen(x, y).slope == pytest.approx(statistics.median(reference_slopes(x, y)))


def test_exact_line_and_constant_series():
    x = np.arange(40) * 10.0
    fit = theil_sen(x, 3.0 + 0.25 * x)
    assert (fit.slope, fit.ci_low, fit.ci_high, fit.positive_fraction) == (0.25, 0.25, 0.25, 1.0)
    assert fit.intercept == pytest.approx(3.0)
    flat = theil_sen(x, np.full(40, 7.0))
    assert (flat.slope, flat.ci_low, flat.ci_high, flat.positive_fraction) == (0.0, 0.0, 0.0, 0.0)


def test_outliers_move_it_little_where_least_squares_breaks():
    rng = np.random.default_rng(1)
    x = np.arange(60) * 10.0
    y = 0.05 * x + rng.normal(0, 0.5, 60)
    y[rng.choice(60, 10, replace=False)] += 400.0  # one sample in six is a spike
    assert theil_sen(x, y).slope == pytest.approx(0.05, rel=0.1)
    assert abs(np.polyfit(x, y, 1)[0] - 0.05) > 0.05  # the mean-based fit is pulled far off


def test_confidence_interval_covers_the_true_slope_at_its_level():
    rng = np.random.default_rng(7)
    x = np.arange(40) * 5.0
    covered = 0
    trials = 400
    for _ in range(trials):
        fit = theil_sen(x, 0.02 * x + rng.normal(0, 1.0, x.size), confidence=0.95)
        covered += fit.ci_low <= 0.02 <= fit.ci_high
    assert 0.91 <= covered / trials <= 0.99
    narrow = theil_sen(x, 0.02 * x + rng.normal(0, 1.0, x.size), confidence=0.6)
    wide = theil_sen(x, 0.02 * x + rng.normal(0, 1.0, x.size), confidence=0.99)
    assert narrow.ci_high - narrow.ci_low < wide.ci_high - wide.ci_low


@pytest.mark.parametrize("x, y, confidence, message", [
    ([0, 1, 2], [0, 1], 0.95, "equal length"),
    ([0, 1, 2], [0, float("nan"), 2], 0.95, "finite"),
    ([1], [1], 0.95, "two points"),
    ([1, 1], [0, 2], 0.95, "two points"),
    ([0, 1, 2], [0, 1, 2], 1.0, "confidence"),
])
def test_bad_input_is_named(x, y, confidence, message):
    with pytest.raises(ValueError, match=message):
        theil_sen(x, y, confidence)
