"""Result tables: atomic per-partition Parquet files and DuckDB views that readers can hold open, in a file
the DuckDB CLI and Python duckdb 1.x and 2.x open, that reads its own tables wherever it is moved."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from core.store.atomic import HOST
from core.store.storage import STORAGE_VERSION, TableStore
from tests.test_chain import readme_queries

pytestmark = pytest.mark.system

GEMMA = "planted-gemma"


def frame(key: str, n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {"release": key.split(":")[0], "sae_id": key.split(":")[1], "feature": range(n), "value": [0.5] * n}
    )


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


def test_read_is_the_stored_frame_in_chunks_with_each_string_held_once(tmp_path, monkeypatch):
    """Chunked reads give exactly DuckDB's whole-table frame (strings, missing values, list columns, the dtypes),
    with one Python object per distinct string across chunks, and ``columns`` selects in the order given."""
    monkeypatch.setattr("core.store.storage.READ_ROWS", 2048)  # five chunks of the 10k rows below
    n = 10_000
    rows = pd.DataFrame(
        {
            "release": "rel",
            "side": ["top", "bottom"] * (n // 2),
            "token": [f"tok{i % 300}" if i % 7 else None for i in range(n)],
            "ids": [[i, i + 1] for i in range(n)],
            "value": [i / 3 for i in range(n)],
        }
    )
    store = TableStore(tmp_path)
    store.write("t", "rel:a", rows)
    read = store.read("t", "rel:a")
    whole = duckdb.connect().execute(f"SELECT * FROM '{store.file('t', 'rel:a')}'").df()
    pd.testing.assert_frame_equal(read, whole)
    assert len({id(v) for v in read["side"]}) == 2
    assert len({id(v) for v in read["token"].dropna()}) == 300
    assert read["token"].isna().sum() == len(range(0, n, 7))
    assert list(store.read("t", "rel:a", ["value", "side"]).columns) == ["value", "side"]
    assert len(store.read("t", columns=["side"])) == n


def test_missing_partition_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no rows stored for 'rel:x'"):
        TableStore(tmp_path).read("t", "rel:x")
    assert TableStore(tmp_path).read("t").empty


def test_failed_write_keeps_previous_rows(tmp_path, monkeypatch):
    store = TableStore(tmp_path)
    store.write("t", "rel:a", frame("rel:a", 3))

    def disk_error(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("core.store.atomic.os.fsync", disk_error)  # fails after the temp file is written
    with pytest.raises(OSError, match="No space left"):
        store.write("t", "rel:a", frame("rel:a", 7))
    assert len(store.read("t", "rel:a")) == 3
    assert [p.name for p in (tmp_path / "tables" / "t").iterdir()] == [store.file("t", "rel:a").name]


def test_writes_succeed_while_another_process_holds_the_database(tmp_path):
    store = TableStore(tmp_path)
    store.write("t", "rel:a", frame("rel:a", 3))
    assert store.refresh_views()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import duckdb, sys, time
            con = duckdb.connect({str(store.db_path)!r})  # read-write: holds the file lock
            print(con.execute("SELECT count(*) FROM t").fetchone()[0], flush=True)
            sys.stdin.readline()
        """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
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
        "dead_here": False,
        "alive_here": True,
        "other_host": True,
    }
    assert store.read("t")["x"].tolist() in ([1, 2], [2, 1])


def duckdb_cli() -> str:
    """The DuckDB CLI of the ``test`` extra (PyPI ``duckdb-cli``), installed beside this interpreter."""
    cli = shutil.which("duckdb", path=str(Path(sys.executable).parent))
    assert cli, "the DuckDB CLI is missing: pip install -e '.[test]' (it brings duckdb-cli)"
    return cli


def cli_rows(cwd: Path, database: str, query: str) -> list[str]:
    """The rows ``duckdb -readonly DATABASE -c QUERY`` prints as CSV, run in ``cwd``."""
    proc = subprocess.run(
        [duckdb_cli(), "-readonly", "-csv", "-noheader", database, "-c", query],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and not proc.stderr, proc.stdout + proc.stderr
    return proc.stdout.splitlines()


@pytest.fixture(scope="module")
def duckdb1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Python duckdb 1.x installed into a folder of its own (this environment has 2.x)."""
    target = tmp_path_factory.mktemp("duckdb1")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), "duckdb<2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"pip could not install duckdb<2:\n{proc.stdout}{proc.stderr}"
    return target


def readme_store(root: Path) -> TableStore:
    """A data directory holding, for two planted-gemma SAEs, a few rows of every table the README's queries
    read — with the columns and values their filters ask for."""
    store = TableStore(root)
    for layer in (0, 3):
        key = f"{GEMMA}:layer_{layer}/width_512/average_l0_32"
        sae = {"release": GEMMA, "sae_id": key.split(":")[1], "layer": layer}
        feature = 7 if layer == 0 else 123
        store.write(
            "output_lens_tokens",
            key,
            pd.DataFrame(
                [
                    {
                        **sae,
                        "sample": "feature",
                        "feature": feature,
                        "side": "top",
                        "rank": rank,
                        "token_id": rank,
                        "token": f"tok{rank}",
                        "value": 1.0 / rank,
                    }
                    for rank in (1, 2)
                ]
            ),
        )
        store.write(
            "vocabulary",
            key,
            pd.DataFrame(
                [
                    {**sae, "token_id": i, "token": f"tok{i}", "token_class": ["normal", "byte", "unused"][i]}
                    for i in range(3)
                ]
            ),
        )
        store.write(
            "feature_classes",
            key,
            pd.DataFrame({**sae, "feature": [0, 1], "output_predicting": [True, False], "semantic": [True, True]}),
        )
        store.write(
            "class_thresholds", key, pd.DataFrame({**sae, "side": "output", "metric": ["topk_z"], "threshold": [2.5]})
        )
        store.write(
            "circuit_stats",
            key,
            pd.DataFrame(
                {
                    **sae,
                    "sample": "feature",
                    "feature": [0],
                    "kind": "qk_feature_query",
                    "phase": "decoder_unembedding",
                    "attn_layer": layer + 1,
                    "head": [0],
                    "softmax_max": [0.25],
                }
            ),
        )
        store.write(
            "c1_sensitivity",
            key,
            pd.DataFrame(
                {
                    **sae,
                    "rule": "null_calibrated",
                    "null": "matched",
                    "quantile": [0.99],
                    "k": [10],
                    "sample": "feature",
                    "n": [2],
                    "hits": [1],
                }
            ),
        )
    store.write(
        "claim_verdicts",
        GEMMA,
        pd.DataFrame(
            {
                "release": GEMMA,
                "sae_id": "",
                "claim": ["C1"],
                "verdict": ["consistent"],
                "value": [0.5],
                "control_value": [0.0],
                "p_value": [0.01],
                "rule": ["null_calibrated"],
            }
        ),
    )
    assert store.refresh_views()
    return store


def test_the_duckdb_cli_opens_the_database_from_the_directory_above(tmp_path):
    """The README's command, run where a user stands: the project directory that holds data/."""
    store = TableStore(tmp_path / "data")
    store.write("t", "rel:a", frame("rel:a", 3))
    assert store.refresh_views()
    assert cli_rows(tmp_path, "data/results.duckdb", "SELECT count(*) FROM t") == ["3"]
    assert cli_rows(
        tmp_path, "data/results.duckdb", "SELECT tags['storage_version'] FROM duckdb_databases() WHERE NOT internal"
    ) == [f"{STORAGE_VERSION}+"]


def test_python_duckdb_1x_reads_the_database(tmp_path, duckdb1):
    store = TableStore(tmp_path / "data")
    store.write("t", "rel:a", frame("rel:a", 3))
    assert store.refresh_views()
    code = (
        "import duckdb, sys; con = duckdb.connect(sys.argv[1], read_only=True); "
        "print(duckdb.__version__, con.execute('SELECT count(*) FROM t').fetchone()[0])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "data/results.duckdb"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(duckdb1)},
    )
    assert proc.returncode == 0, proc.stderr
    version, count = proc.stdout.split()
    assert version.startswith("1.") and count == "3"


def test_a_moved_or_copied_data_directory_reads_its_own_tables(tmp_path):
    """After ``mv data moved`` the README's queries answer from the new place — in Python, and in the CLI from
    the directory above, from inside and by absolute path; a copy reads its own files, not the original's."""
    readme_store(tmp_path / "data")
    (tmp_path / "data").rename(tmp_path / "moved")
    moved = TableStore(tmp_path / "moved")
    queries = readme_queries()
    assert len(queries) >= 6
    with moved.connect() as con:
        for query in queries:
            assert con.execute(query).fetchall(), query
    for query in queries:
        assert cli_rows(tmp_path, "moved/results.duckdb", query), query
    assert cli_rows(moved.root, "results.duckdb", "SELECT count(*) FROM feature_classes") == ["4"]
    assert cli_rows(Path("/"), str(moved.db_path), "SELECT count(*) FROM feature_classes") == ["4"]

    shutil.copytree(moved.root, tmp_path / "copy")
    moved.write("claim_verdicts", GEMMA, pd.DataFrame({"release": GEMMA, "sae_id": "", "claim": ["C1", "C2"]}))
    assert cli_rows(tmp_path, "moved/results.duckdb", "SELECT count(*) FROM claim_verdicts") == ["2"]
    assert cli_rows(tmp_path, "copy/results.duckdb", "SELECT count(*) FROM claim_verdicts") == ["1"]


def test_a_database_of_the_old_layout_is_rebuilt(tmp_path):
    """A results.duckdb that duckdb 2.x wrote in its own format, with absolute paths (before this layout), is
    replaced on the next refresh, and no file is left beside it."""
    store = TableStore(tmp_path / "data")
    store.write("t", "rel:a", frame("rel:a", 3))
    with duckdb.connect(str(store.db_path)) as con:
        con.execute(f"CREATE VIEW t AS SELECT * FROM read_parquet('{store.tables_dir}/t/*.parquet')")
    proc = subprocess.run(
        [duckdb_cli(), "-readonly", str(store.db_path), "-c", "SELECT 1"], capture_output=True, text=True, timeout=60
    )
    assert "version number" in proc.stdout + proc.stderr  # what a user of the CLI saw
    assert store.refresh_views()
    assert cli_rows(tmp_path, "data/results.duckdb", "SELECT count(*) FROM t") == ["3"]
    assert sorted(p.name for p in store.root.iterdir()) == ["results.duckdb", "tables"]
