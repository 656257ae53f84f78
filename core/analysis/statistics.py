"""Statistics behind the claims: binomial intervals, null-calibrated thresholds, rank tests, and the
layer-as-unit tests of the verdicts (permutation test of a depth shape over layer order, the van Elteren
stratified rank test, a sign-flip test and a bootstrap over layers). scipy is not a dependency; each test is
checked against an exact enumeration in tests/test_statistics.py."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

DEFAULT_QUANTILE = 0.99  # every null-calibrated threshold: the null's P99 (false-positive rate 1 %)


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


QUANTILE_STATS = {"median": 0.5, "p75": 0.75, "p99": 0.99}


def summary_statistic(values: np.ndarray, name: str) -> np.ndarray:
    """``name`` ('mean', or 'median' / 'p75' / 'p99', linear interpolation) over the last axis of ``values``."""
    if name == "mean":
        return values.mean(axis=-1)
    if name in QUANTILE_STATS:
        return np.quantile(values, QUANTILE_STATS[name], axis=-1)
    raise ValueError(f"unknown statistic {name!r}: use 'mean' or one of {sorted(QUANTILE_STATS)}")


def quadratic_fit(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares coefficients (a, b, c) of ``y ≈ a + b z + c z²``; y may be (L,) or (L, B)."""
    design = np.stack([np.ones_like(z), z, z * z], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    return coef


@dataclass(frozen=True)
class ShapeTest:
    """One-sided permutation test of a pre-registered depth shape over layer order.

    Statistic: ``t = sign · c`` with c the curvature of the least-squares quadratic through the per-layer
    values over normalised depth, sign +1 for ``U`` (convex), −1 for ``inverted-U`` (concave), and 0 for a
    ``flat`` hypothesis (which is then not tested). Null: the layer values are exchangeable over depth (no
    depth structure); p = #{permutations π : t(π) ≥ t} / #permutations, over all L! orders when L! ≤
    ``max_exact`` (the identity included, so p ≥ 1/L!), else over ``n_perm`` random orders plus the
    identity. ``p_opposite`` is the same test for the opposite shape. ``vertex`` = −b / 2c of the fit."""

    statistic: float
    p_value: float
    p_opposite: float
    vertex: float
    n_layers: int
    n_permutations: int


def min_layers_for(alpha: float) -> int:
    """The smallest L with 1/L! < alpha: fewer layers cannot reach significance in a permutation test."""
    n = 1
    while 1 / math.factorial(n) >= alpha:
        n += 1
    return n


def shape_permutation_test(
    values: np.ndarray, depth: np.ndarray, shape: str, n_perm: int = 20000, max_exact: int = 40320, seed: int = 0
) -> ShapeTest:
    """``ShapeTest`` of per-layer ``values`` at normalised ``depth`` against hypothesis ``shape``."""
    values, depth = np.asarray(values, dtype=np.float64), np.asarray(depth, dtype=np.float64)
    n = len(values)
    sign = {"U": 1.0, "inverted-U": -1.0}.get(shape)
    if sign is None:
        raise ValueError(f"shape {shape!r} has no one-sided curvature test (U or inverted-U)")
    if n < 3:
        raise ValueError("a quadratic shape needs at least 3 layers")
    if math.factorial(n) <= max_exact:
        orders = np.array(list(itertools.permutations(range(n))))
    else:
        rng = np.random.default_rng(seed)
        orders = np.vstack([np.arange(n), np.argsort(rng.random((n_perm, n)), axis=1)])
    curvature = quadratic_fit(depth, values[orders].T)[2]  # (n_orders,)
    a, b, c = quadratic_fit(depth, values)
    observed = sign * c
    tol = 1e-12 * max(1.0, abs(c))  # ties from permutations equal up to rounding count as ties
    p = float(np.mean(sign * curvature >= observed - tol))
    p_opp = float(np.mean(-sign * curvature >= -observed - tol))
    vertex = float(-b / (2 * c)) if c != 0 else float("nan")
    return ShapeTest(float(observed), p, p_opp, vertex, n, len(orders))


@dataclass(frozen=True)
class StratifiedRankTest:
    """Van Elteren's stratified Wilcoxon–Mann–Whitney test (van Elteren 1960; Lehmann, *Nonparametrics*
    §3.3): per stratum l with n_x, n_y ≥ the minimum, U_l of x vs y, weight w_l = 1 / (n_xl + n_yl + 1);
    ``z = Σ w_l (U_l − E U_l) / sqrt(Σ w_l² Var U_l)`` (tie-corrected variances), ``p_greater`` one-sided
    (x larger). Effect: ``auroc`` = Σ_l n_xl n_yl AUROC_l / Σ_l n_xl n_yl (P(X > Y) within layers, pooled
    by pair counts) with a 95 % percentile CI from resampling directions within each stratum (NaN for
    ``n_boot`` 0)."""

    z: float
    p_greater: float
    auroc: float
    ci_low: float
    ci_high: float
    strata: int
    n_x: int
    n_y: int


def _u_moments(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(U, E U, Var U) of x vs y, average ranks and tie-corrected variance (as ``mann_whitney``)."""
    n_x, n_y = len(x), len(y)
    pooled = np.concatenate([x, y])
    n = n_x + n_y
    u = float(rankdata(pooled)[:n_x].sum() - n_x * (n_x + 1) / 2.0)
    _, counts = np.unique(pooled, return_counts=True)
    tie_term = float((counts.astype(np.float64) ** 3 - counts).sum()) / (n * (n - 1))
    return u, n_x * n_y / 2.0, n_x * n_y / 12.0 * ((n + 1) - tie_term)


def _u_statistic(x: np.ndarray, y: np.ndarray) -> float:
    """U of x vs y = #{x > y} + #{x = y} / 2, by binary search in the sorted y."""
    y = np.sort(y)
    below, upto = np.searchsorted(y, x, side="left"), np.searchsorted(y, x, side="right")
    return float(below.sum() + 0.5 * (upto - below).sum())


def stratified_rank_test(
    strata: list[tuple[np.ndarray, np.ndarray]], n_boot: int = 500, seed: int = 0
) -> StratifiedRankTest:
    """``StratifiedRankTest`` over ``strata`` = [(x_l, y_l), ...] (strata already filtered for size)."""
    if not strata:
        nan = float("nan")
        return StratifiedRankTest(nan, nan, nan, nan, nan, 0, 0, 0)
    num = den = pairs = weighted_auc = 0.0
    for x, y in strata:
        u, mean, var = _u_moments(x, y)
        w = 1.0 / (len(x) + len(y) + 1)
        num, den = num + w * (u - mean), den + w * w * var
        pairs, weighted_auc = pairs + len(x) * len(y), weighted_auc + u
    z = num / math.sqrt(den) if den > 0 else 0.0
    rng = np.random.default_rng(seed)
    boots = np.zeros(n_boot)
    for x, y in strata:
        for b in range(n_boot):
            boots[b] += _u_statistic(x[rng.integers(0, len(x), len(x))], y[rng.integers(0, len(y), len(y))])
    low, high = np.quantile(boots / pairs, [0.025, 0.975]) if n_boot > 0 else (float("nan"), float("nan"))
    return StratifiedRankTest(
        float(z),
        0.5 * math.erfc(z / math.sqrt(2.0)),
        weighted_auc / pairs,
        float(low),
        float(high),
        len(strata),
        sum(len(x) for x, _ in strata),
        sum(len(y) for _, y in strata),
    )


def sign_flip_test(values: np.ndarray, n_flips: int = 20000, seed: int = 0) -> tuple[float, float]:
    """One-sided p-values (mean > 0, mean < 0) of per-layer ``values`` by sign flipping: under H0 each layer's
    value is symmetric about 0 (no feature-specific effect), so every sign pattern is equally likely; over
    all 2^L patterns when L ≤ 15 (the observed one included), else ``n_flips`` random ones plus the observed.
    Exact at any number of layers, unlike a bootstrap over a handful of layers."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n <= 15:
        signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
    else:
        rng = np.random.default_rng(seed)
        signs = np.vstack([np.ones(n), rng.choice([-1.0, 1.0], (n_flips, n))])
    means, observed = (signs * values).mean(1), values.mean()
    tol = 1e-12 * max(1.0, float(np.abs(values).max(initial=0.0)))
    return float(np.mean(means >= observed - tol)), float(np.mean(means <= observed + tol))


def layer_bootstrap(
    values: np.ndarray, n_boot: int = 2000, seed: int = 0, weights: np.ndarray | None = None
) -> tuple[float, float]:
    """95 % percentile interval of the (``weights``-weighted) mean of per-layer ``values``, layers resampled
    with replacement: the interval a claim gets when layers, not directions, are the unit."""
    values = np.asarray(values, dtype=np.float64)
    w = np.ones_like(values) if weights is None else np.asarray(weights, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), (n_boot, len(values)))
    means = (values[idx] * w[idx]).sum(1) / w[idx].sum(1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(low), float(high)
