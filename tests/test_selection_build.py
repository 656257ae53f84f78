"""Building and loading the native selection library (core/selection.py)."""

from __future__ import annotations

import pytest

from core import selection
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
