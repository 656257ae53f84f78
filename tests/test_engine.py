"""core.compute.engine.row_stats against a naive reference that materialises the score matrix.

Every test runs on both paths: the compiled one (core/compute/rowstats.cpp, CPU; with its default and with its
smallest column blocks) and torch's (CUDA, or a machine without a C++ compiler)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from core.compute import engine, rowstats
from core.compute.engine import RowStats, row_stats

pytestmark = pytest.mark.unit

EXACT = ("top_ids", "top_values", "bottom_ids", "bottom_values", "median", "p75")
CLOSE = ("mean", "std", "softmax_max", "softmax_entropy", "topk_mass")


def reference(scores: Tensor, k: int) -> dict[str, Tensor]:
    """Statistics of the materialised float32 matrix; ordering by (value, id) via numpy lexsort."""
    x = scores.numpy()
    ids = np.arange(x.shape[1])
    top = np.stack([np.lexsort((ids, -row))[:k] for row in x]).reshape(len(x), k)
    bottom = np.stack([np.lexsort((ids, row))[:k] for row in x]).reshape(len(x), k)
    x64 = scores.double()
    p = torch.softmax(x64, dim=1)
    top_ids = torch.from_numpy(top)
    return {
        "top_ids": top_ids,
        "top_values": scores.gather(1, top_ids),
        "bottom_ids": torch.from_numpy(bottom),
        "bottom_values": scores.gather(1, torch.from_numpy(bottom)),
        "mean": x64.mean(1),
        "std": x64.std(1, correction=0),
        "median": torch.quantile(scores, 0.5, dim=1, interpolation="lower"),
        "p75": torch.quantile(scores, 0.75, dim=1, interpolation="lower"),
        "softmax_max": p.max(1).values,
        "softmax_entropy": torch.special.entr(p).sum(1),  # -p log p, 0 at p = 0
        "topk_mass": p.gather(1, top_ids).sum(1),
    }


@pytest.fixture(autouse=True, params=["native", "native-64-column-blocks", "torch"])
def stats_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The compiled path with its default column blocks (one block for most shapes here), with blocks of
    64 columns (the smallest: many blocks, a ragged last one), and the torch path."""
    if request.param.startswith("native"):
        assert rowstats.native() is not None, "the C++ row statistics could not be built (see the log)"
        if request.param == "native-64-column-blocks":
            monkeypatch.setattr(engine, "_BLOCK_BYTES", 1)
    else:
        monkeypatch.setattr(rowstats, "native", lambda: None)
    return request.param


def assert_matches(got: RowStats, scores: Tensor, k: int) -> None:
    want = reference(scores, k)
    for name in EXACT:
        assert torch.equal(getattr(got, name), want[name].to(getattr(got, name).dtype)), name
    for name in CLOSE:
        value = getattr(got, name)
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value.double(), want[name], rtol=1e-5, atol=1e-5, msg=name)


def integer_inputs(n_a: int, n_b: int, r: int = 3, span: int = 2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Small integers: exact float32 products and many ties."""
    g = torch.Generator().manual_seed(seed)
    left = torch.randint(-span, span + 1, (n_a, r), generator=g).float()
    right = torch.randint(-span, span + 1, (n_b, r), generator=g).float()
    return left, right


def budget_for(tile: int, n_b: int) -> int:
    """A budget that gives CPU tiles of exactly ``tile`` rows (stats on whole tiles)."""
    return tile * n_b * (4 + engine._CHUNK_TEMP_BYTES)


@pytest.mark.parametrize("tile", [1, 3, 7, 64, 1000])
@pytest.mark.parametrize("n_a", [1, 20])
def test_ties_match_reference_for_any_tile(tile: int, n_a: int) -> None:
    left, right = integer_inputs(n_a, 50)
    calls: list[tuple[int, int]] = []
    got = row_stats(
        left, right, k=6, memory_budget_bytes=budget_for(tile, 50), progress=lambda d, n: calls.append((d, n))
    )
    assert_matches(got, left @ right.T, 6)
    step = min(tile, n_a)
    assert calls == [(min(n_a, s + step), n_a) for s in range(0, n_a, step)]


def test_float_scores_exact_via_identity() -> None:
    """right = I makes the score matrix equal left bit for bit, so every statistic is checked exactly."""
    scores = torch.randn(37, 300, generator=torch.Generator().manual_seed(1)) * 3
    got = row_stats(scores, torch.eye(300), k=10, memory_budget_bytes=budget_for(8, 300))
    assert_matches(got, scores, 10)


def test_cache_chunks_inside_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "_CHUNK_BYTES", 3 * 4 * 300)  # 3-row stats chunks
    scores = torch.randn(29, 300, generator=torch.Generator().manual_seed(2))
    assert engine._plan(29, 300, budget_for(11, 300), False, True)[1] == 3
    got = row_stats(scores, torch.eye(300), k=4, memory_budget_bytes=budget_for(11, 300))
    assert_matches(got, scores, 4)


@pytest.mark.parametrize("sample, margin", [(16, 0.0), (64, 0.5), (4096, 3.0)])
def test_quantile_brackets_hit_or_miss(monkeypatch: pytest.MonkeyPatch, sample: int, margin: float) -> None:
    """Tiny samples and margins make brackets miss (kthvalue fallback); results stay exact."""
    monkeypatch.setattr(engine, "_SAMPLE", sample)
    monkeypatch.setattr(engine, "_MARGIN_SD", margin)
    g = torch.Generator().manual_seed(3)
    scores = torch.cat([torch.randn(10, 5000, generator=g), torch.randn(10, 5000, generator=g).sort(1).values ** 3])
    got = row_stats(scores, torch.eye(5000), k=5)
    assert_matches(got, scores, 5)


def test_long_rows_exact() -> None:
    """Rows long enough for the native path's histogram step inside the quantile brackets, with
    heavy ties, heavy tails, a constant row (an empty bracket range) and a sorted row."""
    g = torch.Generator().manual_seed(8)
    n = 120_000
    scores = torch.stack(
        [
            torch.randn(n, generator=g),
            torch.randint(-3, 4, (n,), generator=g).float(),
            torch.randn(n, generator=g) ** 5,
            torch.full((n,), 2.5),
            torch.linspace(-1, 1, n),
        ]
    )
    assert_matches(row_stats(torch.eye(len(scores)), scores.T.contiguous(), k=7), scores, 7)  # I @ scores = scores


@pytest.mark.parametrize("cap", [3.0, 30.0])
def test_softcap(cap: float) -> None:
    """Scores are softcapped before every statistic: order statistics equal those of the reference
    up to the tanh's last-bit rounding (1e-6 relative), moments to float32 rounding."""
    g = torch.Generator().manual_seed(5)
    left, right = torch.randn(9, 16, generator=g) * 4, torch.randn(2000, 16, generator=g)
    got = row_stats(left, right, k=8, softcap=cap, memory_budget_bytes=budget_for(4, 2000))
    want = reference(torch.tanh(left @ right.T / cap) * cap, 8)
    for name in EXACT + CLOSE:
        torch.testing.assert_close(getattr(got, name).double(), want[name].double(), rtol=1e-5, atol=1e-5, msg=name)


def test_bf16_within_documented_bound() -> None:
    """bf16 rounds both operands and the product to 8 significant bits: every score moves by at
    most 3 * 2**-8 * (|left| @ |right|.T); order statistics, mean and std are 1-Lipschitz in that norm."""
    g = torch.Generator().manual_seed(6)
    left, right = torch.randn(17, 64, generator=g), torch.randn(500, 64, generator=g)
    exact = row_stats(left, right, k=5)
    approx = row_stats(left, right, k=5, compute_dtype=torch.bfloat16, memory_budget_bytes=budget_for(5, 500))
    bound = 3 * 2**-8 * (left.abs() @ right.abs().T).max(1).values
    for name in ("top_values", "bottom_values", "median", "p75", "mean", "std"):
        a, b = getattr(exact, name), getattr(approx, name)
        assert b.dtype == torch.float32
        diff = (a - b).abs().reshape(len(a), -1).max(1).values
        assert (diff <= bound).all(), name


def test_k_larger_than_n_b_errors() -> None:
    with pytest.raises(ValueError, match="k must be"):
        row_stats(torch.ones(2, 3), torch.ones(4, 3), k=5)


def test_budget_too_small_errors() -> None:
    with pytest.raises(ValueError, match="cannot hold one row"):
        row_stats(torch.ones(2, 3), torch.ones(400, 3), memory_budget_bytes=100)


def test_k_equal_n_b_sorts_whole_row() -> None:
    left, right = integer_inputs(5, 7, seed=7)
    assert_matches(row_stats(left, right, k=7), left @ right.T, 7)


def test_empty_left() -> None:
    got = row_stats(torch.empty(0, 3), torch.ones(10, 3), k=4)
    assert got.top_ids.shape == (0, 4) and got.top_ids.dtype == torch.int64
    assert got.bottom_values.shape == (0, 4) and got.mean.shape == (0,)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n_a=st.integers(0, 12),
    n_b=st.integers(1, 60),
    k_frac=st.floats(0, 1),
    tile=st.integers(1, 15),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes(n_a: int, n_b: int, k_frac: float, tile: int, ties: bool, seed: int) -> None:
    k = max(1, math.ceil(k_frac * n_b))
    if ties:
        left, right = integer_inputs(n_a, n_b, seed=seed)
        scores = left @ right.T
    else:
        scores = torch.randn(n_a, n_b, generator=torch.Generator().manual_seed(seed))
        left, right = scores, torch.eye(n_b)
    got = row_stats(left, right, k=k, memory_budget_bytes=budget_for(tile, n_b))
    if n_a:
        assert_matches(got, scores, k)
    else:
        assert got.top_ids.shape == (0, k)


def test_shifted_stats_equal_the_stats_of_the_shifted_rows():
    """``RowStats.shifted(c)`` is ``row_stats`` of ``left @ right.T + c[:, None]`` (a column of c on the left, of ones
    on the right): values, mean and quantiles move, ids, std and the softmax statistics stay."""
    g = torch.Generator().manual_seed(3)
    left, right, offset = (
        torch.randn(40, 16, generator=g),
        torch.randn(500, 16, generator=g),
        torch.randn(40, generator=g),
    )
    shifted = row_stats(left, right, k=5).shifted(offset)
    direct = row_stats(torch.cat([left, offset[:, None]], 1), torch.cat([right, torch.ones(500, 1)], 1), k=5)
    for field in dataclasses.fields(direct):
        torch.testing.assert_close(getattr(shifted, field.name), getattr(direct, field.name), rtol=1e-5, atol=1e-5)
