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
    return _count_check(name, len(frame), expected)


def _count_check(name: str, rows: int, expected: int) -> Check:
    return Check(name, rows == expected, f"{rows} rows, expected {expected}")


def finite(name: str, frame: pd.DataFrame, columns: list[str]) -> Check:
    """No NaN/Inf in the numeric ``columns``."""
    tally = RowTally(columns)
    tally.add(frame)
    return tally.finite(name)


class RowTally:
    """``rows_match`` and ``finite`` for a table whose rows pass by in parts (streamed to disk, never held
    whole): ``add`` each part, then ask for the checks."""

    def __init__(self, columns: list[str]) -> None:
        self.columns = columns
        self.rows = 0
        self.bad = dict.fromkeys(columns, 0)

    def add(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Count the part's rows and non-finite values; returns it unchanged."""
        self.rows += len(frame)
        for c in self.columns:
            self.bad[c] += int((~np.isfinite(frame[c].to_numpy(dtype=np.float64))).sum())
        return frame

    def rows_match(self, name: str, expected: int) -> Check:
        return _count_check(name, self.rows, expected)

    def finite(self, name: str) -> Check:
        bad = {c: n for c, n in self.bad.items() if n}
        return Check(
            name, not bad, f"non-finite values: {bad}" if bad else f"all finite in {len(self.columns)} columns"
        )


def ids_in_range(name: str, frame: pd.DataFrame, column: str, upper: int) -> Check:
    """Every id in ``column`` lies in ``0..upper-1`` (token ids inside the vocabulary)."""
    ids = frame[column].to_numpy()
    outside = int(((ids < 0) | (ids >= upper)).sum())
    return Check(name, outside == 0, f"{outside} ids outside 0..{upper - 1}")


def combined(name: str, parts: list[Check]) -> Check:
    """One check that passes when every part passes; the detail lists each part's."""
    return Check(name, all(c.passed for c in parts), "; ".join(f"{c.name}: {c.detail}" for c in parts))
