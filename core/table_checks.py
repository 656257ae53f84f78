"""Integrity checks of result tables, as plain data (the assets report them as Dagster asset checks)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


def rows_match(name: str, frame: pd.DataFrame, expected: int) -> Check:
    """The table has exactly ``expected`` rows (e.g. one per feature × side × rank)."""
    return Check(name, len(frame) == expected, f"{len(frame)} rows, expected {expected}")


def finite(name: str, frame: pd.DataFrame, columns: list[str]) -> Check:
    """No NaN/Inf in the numeric ``columns``."""
    bad = {c: int((~np.isfinite(frame[c].to_numpy(dtype=np.float64))).sum()) for c in columns}
    bad = {c: n for c, n in bad.items() if n}
    return Check(name, not bad, f"non-finite values: {bad}" if bad else f"all finite in {len(columns)} columns")


def ids_in_range(name: str, frame: pd.DataFrame, column: str, upper: int) -> Check:
    """Every id in ``column`` lies in ``0..upper-1`` (token ids inside the vocabulary)."""
    ids = frame[column].to_numpy()
    outside = int(((ids < 0) | (ids >= upper)).sum())
    return Check(name, outside == 0, f"{outside} ids outside 0..{upper - 1}")


def combined(name: str, parts: list[Check]) -> Check:
    """One check that passes when every part passes; the detail lists each part's."""
    return Check(name, all(c.passed for c in parts), "; ".join(f"{c.name}: {c.detail}" for c in parts))
