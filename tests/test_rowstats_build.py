"""Building and loading the compiled row statistics (core/compute/rowstats.py), and its portable build."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch
from torch import Tensor

from core.compute import engine, rowstats
from core.compute.engine import row_stats
from tests.test_engine import EXACT, assert_matches, integer_inputs, reference

pytestmark = pytest.mark.system


def test_build_is_cached_and_a_missing_compiler_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    library = rowstats.build(tmp_path)
    assert library.exists() and rowstats.build(tmp_path) == library
    assert [p.name for p in tmp_path.iterdir()] == [library.name]  # no temporary left behind
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    monkeypatch.setenv("WEIGHTLENS_NATIVE_DIR", str(tmp_path / "empty"))
    rowstats.native.cache_clear()
    try:
        assert rowstats.native() is None
        assert "native row statistics unavailable" in caplog.text
        left, right = integer_inputs(6, 30, seed=9)
        assert_matches(row_stats(left, right, k=4), left @ right.T, 4)
    finally:
        rowstats.native.cache_clear()


def streamed(
    lib: ctypes.CDLL, x: Tensor, k: int, cap: float | None, sample: Tensor, brackets: list
) -> dict[str, Tensor]:
    """The kernel's statistics of the rows of ``x`` fed in blocks of 1000 columns (a ragged last one)."""
    blocks = ((c0, x[:, c0 : c0 + 1000]) for c0 in range(0, x.shape[1], 1000))
    return rowstats.compute(lib, x[:, sample], blocks, x.shape[1], k, cap, brackets, lambda rows: x[rows])


@pytest.mark.parametrize("cap", [None, 5.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_portable_build_matches_the_vector_build_and_the_reference(
    tmp_path: Path, cap: float | None, dtype: torch.dtype
) -> None:
    """The library built for the baseline x86-64 CPU (SSE2 lanes; no AVX2, FMA or AVX-512) gives what the
    default build gives
    (order statistics bit for bit; moments to float32 rounding) on ties, heavy tails, a constant row,
    long rows (histogram inside the brackets) and short ones (brackets that miss). Softcapped values
    agree to the tanh's rounding; their ids are not compared (tanh saturates the tails to ties whose
    order depends on the last bit)."""
    portable = rowstats.load(rowstats.build(tmp_path, ("-march=x86-64",)))
    g = torch.Generator().manual_seed(10)
    n = 70_001
    rows = torch.stack(
        [
            torch.randn(n, generator=g) * 4,
            torch.randint(-2, 3, (n,), generator=g).float(),
            torch.randn(n, generator=g) ** 3,
            torch.full((n,), 1.5),
        ]
    ).to(dtype)
    for x in (rows, rows[:, :37].contiguous()):
        sample = torch.randperm(x.shape[1], generator=g)[:64].sort().values
        brackets = engine._brackets(x.shape[1], len(sample))
        got, vector = (streamed(lib, x, 5, cap, sample, brackets) for lib in (portable, rowstats.native()))
        scores = x.float() if cap is None else torch.tanh(x.float() / cap) * cap
        want = reference(scores, 5)
        for name, value in got.items():
            if name.endswith("_ids") and cap is not None:
                continue
            if name in EXACT and cap is None:
                assert torch.equal(value, vector[name]) and torch.equal(value, want[name].to(value.dtype)), name
            else:
                torch.testing.assert_close(value.double(), vector[name].double(), rtol=1e-5, atol=1e-5, msg=name)
                torch.testing.assert_close(value.double(), want[name].double(), rtol=1e-5, atol=1e-5, msg=name)
