"""Small statistics used by the claims: binomial confidence intervals and null-calibrated thresholds."""

from __future__ import annotations

import math
from dataclasses import dataclass

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


def rankdata(values: np.ndarray) -> np.ndarray:
    """Average ranks (1-based; ties share the mean of the ranks they span), like scipy's default."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    # boundaries of tie blocks in the sorted order
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + 1 + e) / 2.0
    return ranks


@dataclass(frozen=True)
class MannWhitney:
    """Two-sided Mann–Whitney U test of x vs y (normal approximation with tie and continuity correction).

    ``u`` = U of x (the number of (x, y) pairs with x > y, ties counting 1/2); ``auroc = u / (n_x n_y)``
    = P(X > Y) + P(X = Y)/2; ``rank_biserial = 2 auroc - 1`` (Kerby 2014: + when x tends to be larger)."""

    u: float
    z: float
    p_value: float
    auroc: float
    rank_biserial: float
    n_x: int
    n_y: int


def mann_whitney(x: np.ndarray, y: np.ndarray) -> MannWhitney:
    """U = R_x − n_x(n_x+1)/2 with R_x the rank sum of x in the pooled sample (average ranks for ties);
    under H0, E[U] = n_x n_y / 2 and Var[U] = n_x n_y / 12 · ((n + 1) − Σ_t (t³ − t) / (n (n − 1)))
    (t = sizes of tie blocks); z = (|U − E[U]| − 1/2) / sqrt(Var[U]) (continuity-corrected, floored at 0);
    p = erfc(z / √2). scipy is not a dependency of this project, hence this implementation
    (checked against an exact permutation test in tests/test_profiles.py)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n_x, n_y = len(x), len(y)
    if n_x == 0 or n_y == 0:
        nan = float("nan")
        return MannWhitney(nan, nan, nan, nan, nan, n_x, n_y)
    pooled = np.concatenate([x, y])
    n = n_x + n_y
    ranks = rankdata(pooled)
    u = float(ranks[:n_x].sum() - n_x * (n_x + 1) / 2.0)
    _, counts = np.unique(pooled, return_counts=True)
    tie_term = float((counts.astype(np.float64) ** 3 - counts).sum()) / (n * (n - 1)) if n > 1 else 0.0
    var = n_x * n_y / 12.0 * ((n + 1) - tie_term)
    mean = n_x * n_y / 2.0
    if var <= 0:
        z, p = 0.0, 1.0
    else:
        z = max(0.0, abs(u - mean) - 0.5) / math.sqrt(var)
        p = math.erfc(z / math.sqrt(2.0))
        z = math.copysign(z, u - mean)
    auroc = u / (n_x * n_y)
    return MannWhitney(u=u, z=z, p_value=min(1.0, p), auroc=auroc, rank_biserial=2 * auroc - 1, n_x=n_x, n_y=n_y)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for boolean ``labels`` (= Mann–Whitney U / (n₊ n₋))."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    return mann_whitney(scores[labels], scores[~labels]).auroc


def summary_statistic(values: np.ndarray, name: str) -> np.ndarray:
    """``name`` ('mean', 'median' or 'p75', linear interpolation) over the last axis of ``values``."""
    if name == "mean":
        return values.mean(axis=-1)
    if name == "median":
        return np.median(values, axis=-1)
    if name == "p75":
        return np.quantile(values, 0.75, axis=-1)
    raise ValueError(f"unknown statistic {name!r}: use 'mean', 'median' or 'p75'")


@dataclass(frozen=True)
class ShapeFit:
    """Quadratic fit ``y = a + b z + c z²`` over normalised depth z ∈ [0, 1] and its bootstrap CI."""

    a: float
    b: float
    curvature: float  # c
    ci_low: float
    ci_high: float
    vertex: float  # −b / (2c): depth of the minimum (U) / maximum (inverted-U)
    shape: str  # "U", "inverted-U", "monotone-convex", "monotone-concave", "flat"
    n_boot: int


def quadratic_fit(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares coefficients (a, b, c) of ``y ≈ a + b z + c z²``; y may be (L,) or (L, B)."""
    design = np.stack([np.ones_like(z), z, z * z], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    return coef


def classify_shape(curvature_ci: tuple[float, float], vertex: float) -> str:
    """Shape from the curvature's CI: CI above 0 → convex, below 0 → concave, containing 0 → ``flat``.
    A convex (concave) fit is a ``U`` (``inverted-U``) when its vertex lies inside the depth range
    [0.1, 0.9]; otherwise the curve is monotone over the layers and is called ``monotone-convex``
    (``monotone-concave``)."""
    low, high = curvature_ci
    if low <= 0 <= high or not np.isfinite(low):
        return "flat"
    inside = 0.1 <= vertex <= 0.9
    if low > 0:
        return "U" if inside else "monotone-convex"
    return "inverted-U" if inside else "monotone-concave"


def depth_shape(
    groups: list[np.ndarray],
    depth: np.ndarray,
    statistic: str = "mean",
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> ShapeFit:
    """Fit a quadratic to the per-layer ``statistic`` ('mean', 'median' or 'p75') of ``groups[l]`` (the
    per-feature values at layer l, normalised depth ``depth[l]``); the curvature's percentile CI comes
    from ``n_boot`` bootstrap replicates that resample features with replacement within each layer."""
    if len(groups) < 3:
        nan = float("nan")
        return ShapeFit(nan, nan, nan, nan, nan, nan, "flat", 0)
    rng = np.random.default_rng(seed)
    point = np.array([summary_statistic(np.asarray(g, dtype=np.float64), statistic) for g in groups])
    boots = np.empty((len(groups), n_boot))
    for i, g in enumerate(groups):
        g = np.asarray(g, dtype=np.float64)
        boots[i] = summary_statistic(g[rng.integers(0, len(g), (n_boot, len(g)))], statistic)
    a, b, c = quadratic_fit(np.asarray(depth, dtype=np.float64), point)
    curvatures = quadratic_fit(np.asarray(depth, dtype=np.float64), boots)[2]
    alpha = (1 - confidence) / 2
    low, high = (float(v) for v in np.quantile(curvatures, [alpha, 1 - alpha]))
    vertex = float(-b / (2 * c)) if c != 0 else float("nan")
    return ShapeFit(float(a), float(b), float(c), low, high, vertex, classify_shape((low, high), vertex), n_boot)
