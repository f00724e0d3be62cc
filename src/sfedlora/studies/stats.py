"""Statistics every study reports: means with 95% t-intervals over seeds, and paired
differences (scipy's t distribution)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def ci95(values) -> float:
    """Half-width of the two-sided 95% t-interval of the mean (nan below two values).
    ``values``: a sequence, an array or a pandas Series (whose std skips NaN, as a
    pandas aggregation expects)."""
    if not hasattr(values, "std"):
        values = np.asarray(values, dtype=float)
    n = len(values)
    if n < 2:
        return math.nan
    return float(stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n))


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """The mean and the half-width of its 95% t-interval."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()), ci95(values)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean and 95% half-width of ``a - b`` paired by position (by seed)."""
    if len(a) != len(b):
        raise ValueError(f"paired values differ in number: {len(a)} and {len(b)}")
    return mean_ci(np.asarray(a, dtype=float) - np.asarray(b, dtype=float))
