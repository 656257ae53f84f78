"""Small statistics used by the claims: binomial confidence intervals and null-calibrated thresholds."""

from __future__ import annotations

import math

import numpy as np


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927); 95 % by default."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def null_threshold(null_values: np.ndarray, quantile: float) -> float:
    """The ``quantile`` of a null distribution (linear interpolation): values above it are called
    positive, so the false-positive rate on the null is ``1 - quantile`` by construction."""
    if len(null_values) == 0:
        raise ValueError("cannot calibrate a threshold on an empty null distribution")
    return float(np.quantile(np.asarray(null_values, dtype=np.float64), quantile))
