"""Result tables: atomic per-partition Parquet files and DuckDB views that readers can hold open."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import duckdb
import pandas as pd
import pytest

from core.atomic import HOST
from core.storage import TableStore


def frame(key: str, n: int) -> pd.DataFrame:
    return pd.DataFrame({"release": key.split(":")[0], "sae_id": key.split(":")[1], "feature": range(n), "value": [0.5] * n})


def test_write_read_views_and_partition_isolation(tmp_path):
    store = TableStore(tmp_path)
    store.write("t", "rel:layer_0/a", frame("rel:layer_0/a", 3))
    store.write("t", "rel:layer_1/a", frame("rel:layer_1/a", 2))
    store.write("t", "rel:layer_0/a", frame("rel:layer_0/a", 4))  # rewrite replaces only this partition
    assert store.keys("t") == ["rel:layer_0/a", "rel:layer_1/a"]
    assert len(store.read("t", "rel:layer_0/a")) == 4
    assert len(store.read("t")) == 6
    assert store.refresh_views()
    with store.connect() as con:
        counts = dict(con.execute("SELECT sae_id, count(*) FROM t GROUP BY sae_id").fetchall())
    assert counts == {"layer_0/a": 4, "layer_1/a": 2}
    assert not [p for p in (tmp_path / "tables" / "t").iterdir() if p.suffix != ".parquet"]


def test_missing_partition_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no rows stored for 'rel:x'"):
        TableStore(tmp_path).read("t", "rel:x")
    assert TableStore(tmp_path).read("t").empty


def test_failed_write_keeps_previous_rows(tmp_path, monkeypatch):
    store = TableStore(tmp_path)
    store.write("t", "rel:a", frame("rel:a", 3))

    def disk_error(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("core.atomic.os.fsync", disk_error)  # fails after the temp file is written
    with pytest.raises(OSError, match="No space left"):
        store.write("t", "rel:a", frame("rel:a", 7))
    assert len(store.read("t", "rel:a")) == 3
    assert [p.name for p in (tmp_path / "tables" / "t").iterdir()] == [store.file("t", "rel:a").name]


def test_writes_succeed_while_another_process_holds_the_database(tmp_path):
    store = TableStore(tmp_path)
    store.write("t", "rel:a", frame("rel:a", 3))
    assert store.refresh_views()
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import duckdb, sys, time
            con = duckdb.connect({str(store.db_path)!r})  # read-write: holds the file lock
            print(con.execute("SELECT count(*) FROM t").fetchone()[0], flush=True)
            sys.stdin.readline()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "3"
        store.write("t", "rel:b", frame("rel:b", 5))  # the materialisation's write goes through
        assert store.refresh_views(attempts=2, wait_s=0.01) is False  # views left as they were
        assert len(store.read("t")) == 8
    finally:
        holder.communicate("\n", timeout=30)
    assert store.refresh_views()
    with duckdb.connect(str(store.db_path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM t").fetchone()[0] == 8


def test_sweep_removes_only_this_hosts_dead_writers_temp_files(tmp_path):
    """Temp files of a killed writer on this host go with the next write; a live writer's, and another
    host's (whose process ids mean nothing here), stay."""
    store = TableStore(tmp_path)
    store.write("t", "a", pd.DataFrame({"x": [1]}))
    folder = store.file("t", "a").parent
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    leftovers = {
        "dead_here": folder / f".a.{HOST}.{dead_pid}.0123abcd.tmp",
        "alive_here": folder / f".a.{HOST}.{os.getpid()}.0123abcd.tmp",
        "other_host": folder / f".a.other-host.{dead_pid}.0123abcd.tmp",
    }
    for path in leftovers.values():
        path.write_bytes(b"half a parquet file")
    store.write("t", "b", pd.DataFrame({"x": [2]}))
    assert {name: path.exists() for name, path in leftovers.items()} == {
        "dead_here": False, "alive_here": True, "other_host": True}
    assert store.read("t")["x"].tolist() in ([1, 2], [2, 1])
