"""``TableStore.appender``: a partition's rows stored frame by frame (``circuit_tables`` streams each circuit's
rows to disk) give the same table as one ``write``, and a failure stores nothing and keeps the old rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.store.storage import TableStore

pytestmark = pytest.mark.unit


def part(i: int, rows: int = 50) -> pd.DataFrame:
    rng = np.random.default_rng(i)
    return pd.DataFrame(
        {
            "release": "r",
            "feature": np.arange(rows) + i * rows,
            "kind": f"k{i % 3}",
            "mean": rng.normal(size=rows),
            "top_ids": [list(rng.integers(0, 99, 4)) for _ in range(rows)],
            "top_values": [list(rng.normal(size=4)) for _ in range(rows)],
        }
    )


def test_appended_frames_equal_one_write(tmp_path):
    streamed, whole = TableStore(tmp_path / "a"), TableStore(tmp_path / "b")
    parts = [part(i) for i in range(7)]
    with streamed.appender("t", "r:x") as append:
        for frame in parts:
            append(frame)
    whole.write("t", "r:x", pd.concat(parts, ignore_index=True))
    pd.testing.assert_frame_equal(streamed.read("t", "r:x"), whole.read("t", "r:x"))
    assert sorted(p.name for p in (tmp_path / "a" / "tables" / "t").iterdir()) == ["r%3Ax.parquet"]  # no staging left


def test_a_failure_mid_stream_stores_nothing_and_keeps_the_previous_rows(tmp_path):
    store = TableStore(tmp_path)
    store.write("t", "r:x", part(0))
    with pytest.raises(RuntimeError, match="engine failed"):
        with store.appender("t", "r:x") as append:
            append(part(1))
            raise RuntimeError("engine failed")
    pd.testing.assert_frame_equal(store.read("t", "r:x"), TableStore(tmp_path).read("t", "r:x"))
    assert store.read("t", "r:x")["feature"].tolist() == part(0)["feature"].tolist()
    assert sorted(p.name for p in (tmp_path / "tables" / "t").iterdir()) == ["r%3Ax.parquet"]
