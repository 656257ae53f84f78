"""Building and loading the native selection library (core/selection.py)."""

from __future__ import annotations

import pytest

import torch

from core import engine, selection
from core.engine import row_stats
from tests.test_engine import assert_matches, integer_inputs


def test_native_build_is_cached_and_a_missing_compiler_falls_back(tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    library = selection.build(tmp_path)
    assert library.exists() and selection.build(tmp_path) == library
    assert [p.name for p in tmp_path.iterdir()] == [library.name]  # no temporary left behind
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    monkeypatch.setenv("WEIGHTLENS_NATIVE_DIR", str(tmp_path / "empty"))
    selection.native.cache_clear()
    try:
        assert selection.native() is None
        assert "native selection unavailable" in caplog.text
        left, right = integer_inputs(6, 30, seed=9)
        assert_matches(row_stats(left, right, k=4), left @ right.T, 4)
    finally:
        selection.native.cache_clear()


def test_portable_loops_match_the_vector_ones(tmp_path) -> None:
    """The library built without AVX-512 (as on CPUs without it) selects exactly what the default
    build and the torch path select, on ties, long rows and short rows."""
    portable = selection.load(selection.build(tmp_path, ("-mno-avx512f",)))
    g = torch.Generator().manual_seed(10)
    n = 70_001
    rows = torch.stack([torch.randn(n, generator=g), torch.randint(-2, 3, (n,), generator=g).float(), torch.randn(n, generator=g) ** 3])
    for x in (rows, rows[:, :37].contiguous()):
        sample = torch.randperm(x.shape[1], generator=g)[:64].sort().values
        brackets = engine._brackets(x.shape[1], len(sample))
        got = selection.select(portable, x, 5, sample, brackets)
        assert all(torch.equal(a, b) for a, b in zip(got, selection.select(selection.native(), x, 5, sample, brackets)))
        assert torch.equal(got[4], torch.quantile(x, torch.tensor([0.5, 0.75]), dim=1, interpolation="lower").T)
