"""Reliability of the stored results, with real processes on persistent Dagster instances
(``tests/reliability_worker.py``; each instance uses the project's ``dagster.yaml``, pool ``compute`` = 1):

- SIGKILL at random points of a table write, and SIGKILL of a run inside a table write: every Parquet file
  reads and holds a whole old or new version; temp files of killed writers are swept by the next write;
  a rerun gives the rows of an uninterrupted run;
- two runs on two partitions at once while an outside DuckDB connection holds ``results.duckdb`` open
  and queries every view: both succeed, the reader never errs nor sees part of a partition, no row is
  lost or duplicated;
- disk full and read-only data dir (small tmpfs mounts), a data dir under a file: a clear error naming
  the file, the stored files byte-for-byte unchanged;
- an HF_TOKEN canary is in no file the runs leave (instance, logs, tables, DuckDB file, report);
- the same partition materialised by separate processes into separate data dirs gives bitwise-identical
  tables (fp32, CPU).

The uninterrupted reference run starts in the background with the module, so the store-level tests
overlap it. Other guarantees are tested elsewhere (README "Reliability guarantees"). Counts of what was
tried go to ``data/reliability_counts.json`` (and are printed with ``-s``).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from core.analysis.semantic import CANDIDATES
from core.lens.circuits import CIRCUIT_SETS, all_circuits, paired_layers
from core.registry import parse_key
from core.store.storage import StorageError, TableStore
from core.weights.discovery import discover_saes, fetch_model
from core.weights.hub import Hub
from tests.reliability_worker import COMPUTE, LOOP_KEY

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("reliability_worker.py")
RELEASE = "planted-gemma"
CANARY = "hf_CANARYxReliability7q3Zk9Lw2Vb8Nd4Tm6Yc1"
TOP_K = 10  # ComputeResource's default, which the worker keeps
COUNTS: dict[str, dict] = {}


@pytest.fixture(scope="module", autouse=True)
def counts_file():
    """Write what the tests tried to data/reliability_counts.json (the README's figures)."""
    yield
    path = ROOT / "data" / "reliability_counts.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(COUNTS, indent=2, sort_keys=True) + "\n")
    print(f"\nreliability counts ({path}):\n{json.dumps(COUNTS, indent=2, sort_keys=True)}")


# ---------------------------------------------------------------- helpers


@dataclass
class Run:
    name: str
    proc: subprocess.Popen
    out: Path
    err: Path

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()


def new_home(path: Path) -> Path:
    """A Dagster instance directory with the project's config (pool ``compute`` limited to 1)."""
    path.mkdir(parents=True)
    shutil.copy(ROOT / "dagster.yaml", path / "dagster.yaml")
    return path


def start(work: Path, name: str, home: Path, cache: Path, data: Path, keys: list[str], *flags: str) -> Run:
    """Start the worker in its own process group, with the canary as HF_TOKEN."""
    env = dict(os.environ, HF_TOKEN=CANARY, HF_HUB_OFFLINE="1", DAGSTER_HOME=str(home), PYTHONPATH=str(ROOT))
    env["MPLCONFIGDIR"] = str(work / "mplconfig")
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    out, err = logs / f"{name}.out", logs / f"{name}.err"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(home), str(cache), str(data), *keys, *flags],
            stdout=o,
            stderr=e,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
    return Run(name, proc, out, err)


def kill(run: Run) -> None:
    """SIGKILL the worker's whole process group and reap it."""
    try:
        os.killpg(run.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    run.proc.wait(timeout=30)


def wait_for(run: Run, pattern: str, timeout: float, stream: str = "stdout") -> str:
    """Poll the run's output until a line matches; fail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, {"stdout": run.stdout, "stderr": run.stderr}[stream]())
        if match:
            return match.group(0)
        if run.proc.poll() is not None:
            pytest.fail(f"{run.name} exited {run.proc.returncode} before {pattern!r}:\n{run.stderr()[-3000:]}")
        time.sleep(0.1)
    kill(run)
    pytest.fail(f"{run.name}: no {pattern!r} within {timeout} s:\n{run.stderr()[-3000:]}")


def finish(run: Run, timeout: float = 400) -> int:
    try:
        return run.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill(run)
        pytest.fail(f"{run.name} still running after {timeout} s:\n{run.stderr()[-3000:]}")


def parquet_files(data: Path) -> dict[str, Path]:
    """``table/file name`` -> path of every Parquet file under ``data/tables``."""
    return {f"{p.parent.name}/{p.name}": p for p in sorted((data / "tables").glob("*/*.parquet"))}


def temp_files(data: Path) -> list[Path]:
    return sorted(p for p in data.rglob("*.tmp") if p.is_file())


def inodes(data: Path) -> dict[str, int]:
    return {name: p.stat().st_ino for name, p in parquet_files(data).items()}


def read(path: Path) -> pd.DataFrame:
    with duckdb.connect() as con:
        return con.execute("SELECT * FROM read_parquet(?)", [str(path)]).df()


def assert_identical(a: pd.DataFrame, b: pd.DataFrame, what: str) -> None:
    """Same columns, dtypes and values; float columns bit for bit."""
    pd.testing.assert_frame_equal(a, b, check_exact=True, obj=what)
    for column in a.columns:
        if a[column].dtype.kind == "f":
            x, y = a[column].to_numpy(), b[column].to_numpy()
            assert np.array_equal(x.view(f"u{x.itemsize}"), y.view(f"u{y.itemsize}")), f"{what}.{column}: bits differ"


def seed(data: Path, reference: Path) -> dict[str, int]:
    """Copy the reference run's tables into ``data`` (the "old" rows), make the views; return inodes."""
    shutil.copytree(reference / "tables", data / "tables")
    assert TableStore(data).refresh_views()
    return inodes(data)


def key_file(key: str) -> str:
    return TableStore("/").file("t", key).name


def partition_tables(data: Path, key: str) -> list[str]:
    """Tables holding a file of this SAE partition (not the per-release ones the report writes)."""
    return sorted(name.split("/")[0] for name in parquet_files(data) if name.endswith(key_file(key)))


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="module")
def keys(planted_cache) -> tuple[str, str]:
    saes = discover_saes(RELEASE, Hub(cache_dir=planted_cache, offline=True)).saes
    return saes[1].key, saes[4].key


@pytest.fixture(scope="module", autouse=True)
def reference_started(planted_cache, work, keys):
    """The uninterrupted run of the first key and the claims report, on its own instance and data dir,
    started with the module so that the store-level tests overlap it."""
    run = start(work, "reference", new_home(work / "ref-home"), planted_cache, work / "ref-data", [keys[0]], "--report")
    yield run
    if run.proc.poll() is None:
        kill(run)


@pytest.fixture(scope="module")
def reference(reference_started, work) -> Path:
    """The reference run's data dir, once it has finished."""
    assert finish(reference_started) == 0, reference_started.stderr()[-5000:]
    assert "hf token visible" in reference_started.stdout()
    return work / "ref-data"


@dataclass
class Reader:
    """An outside DuckDB connection held open read-only on results.duckdb, querying every view in a loop."""

    db: Path
    tables: list[str]
    stop: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)
    rounds: int = 0
    queries: int = 0
    errors: list[str] = field(default_factory=list)
    seen: dict[tuple[str, str], set[int]] = field(default_factory=dict)
    final: dict[tuple[str, str], int] = field(default_factory=dict)

    def counts(self, con) -> dict[tuple[str, str], int]:
        found = {}
        for table in self.tables:
            for sae_id, n in con.execute(f'SELECT sae_id, count(*) FROM "{table}" GROUP BY sae_id').fetchall():
                found[(table, sae_id)] = n
            self.queries += 1
        return found

    def loop(self) -> None:
        con = duckdb.connect(str(self.db), read_only=True)
        try:
            while True:
                try:
                    for k, n in self.counts(con).items():
                        self.seen.setdefault(k, set()).add(n)
                except duckdb.Error as error:
                    self.errors.append(str(error))
                self.rounds += 1
                self.started.set()
                if self.stop.wait(0.5):
                    break
            self.final = self.counts(con)  # the same connection, after every run ended
        finally:
            con.close()


@dataclass
class Scenario:
    """What the crash-and-concurrency sequence saw; the tests assert on it."""

    data: Path
    seeded: dict[str, int]
    expected: dict[str, pd.DataFrame]
    reader: Reader
    at_kill: dict[str, int] = field(default_factory=dict)  # inodes
    unreadable_or_mixed: dict[str, str] = field(default_factory=dict)
    orphans_at_kill: list[Path] = field(default_factory=list)
    other_files_at_kill: list[Path] = field(default_factory=list)
    view_counts_at_kill: dict[str, int] = field(default_factory=dict)
    blocked_on_pool: bool = False
    before_rerun: dict[str, int] = field(default_factory=dict)  # inodes
    runs: list[Run] = field(default_factory=list)  # the rerun of the first key, the run of the second
    rcs: list[int] = field(default_factory=list)
    seconds: float = 0.0


def observe_after_kill(sc: Scenario) -> None:
    files = parquet_files(sc.data)
    sc.at_kill = {name: p.stat().st_ino for name, p in files.items()}
    for name, path in files.items():
        try:
            assert_identical(read(path), sc.expected[name], f"after kill: {name}")
        except (AssertionError, duckdb.Error) as error:
            sc.unreadable_or_mixed[name] = str(error)[:500]
    sc.orphans_at_kill = temp_files(sc.data)
    artifacts = [sc.data / "exports", sc.data / "browser"]  # whole files users open, each written atomically
    sc.other_files_at_kill = [
        p
        for p in sc.data.rglob("*")
        if p.is_file()
        and p.suffix not in (".parquet", ".tmp")
        and p.name != "results.duckdb"
        and not any(p.is_relative_to(a) for a in artifacts)
    ]
    for export in (sc.data / "exports").rglob("*.json"):  # a stage writes its export before its tables are stored
        json.loads(export.read_text())
    with duckdb.connect(str(sc.data / "results.duckdb"), read_only=True) as con:
        for table in {name.split("/")[0] for name in sc.expected}:
            sc.view_counts_at_kill[table] = con.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]


@pytest.fixture(scope="module")
def scenario(reference, planted_cache, work, keys) -> Scenario:
    """One instance and data dir seeded with the reference run's tables (the "old" rows), an outside
    reader holding results.duckdb open throughout, and in turn:

    1. a run of the first key, SIGKILLed inside a table write: after sae_features, circuit_stats and
       output_lens_tokens were replaced, with output_lens_stats written to its temp file, not yet renamed;
    2. a plain rerun, which waits on the ``compute`` pool slot the killed run still holds: killed too;
    3. at once: a rerun of the first key with ``--recover`` (fails the dead runs, frees their slots) and a
       run of the second key — two runs on two partitions of one instance and data dir.
    """
    data = work / "data"
    sc = Scenario(
        data,
        seed(data, reference),
        {n: read(p) for n, p in parquet_files(reference).items()},
        Reader(data / "results.duckdb", partition_tables(reference, keys[0])),
    )
    thread = threading.Thread(target=sc.reader.loop, daemon=True)
    thread.start()
    assert sc.reader.started.wait(30)
    home = new_home(work / "home")

    killed = start(work, "killed", home, planted_cache, data, [keys[0]], "--pause-before-replace", "output_lens_stats")
    wait_for(killed, r"paused \S+", timeout=300)
    kill(killed)
    observe_after_kill(sc)
    blocked = start(work, "blocked", home, planted_cache, data, [keys[0]])
    wait_for(blocked, r"blocked by limit for pool compute", timeout=120, stream="stderr")
    sc.blocked_on_pool = True
    kill(blocked)

    sc.before_rerun = inodes(data)
    t0 = time.monotonic()
    sc.runs = [
        start(work, "rerun", home, planted_cache, data, [keys[0]], "--recover"),
        start(work, "second", home, planted_cache, data, [keys[1]]),
    ]
    sc.rcs = [finish(run) for run in sc.runs]
    sc.seconds = time.monotonic() - t0
    sc.reader.stop.set()
    thread.join(60)
    return sc


# ---------------------------------------------------------------- crash mid-write


def test_sigkill_at_random_points_of_a_table_write(tmp_path):
    """Kill writers at random moments until at least two kills have landed inside a write (and ten in all).

    Where a kill lands depends on the machine's speed, so the loop counts kills rather than fixing them;
    the cap keeps a machine on which no kill ever lands mid-write a failure, not a hang.
    """
    rows, least, most = 400_000, 10, 60
    store = TableStore(tmp_path)
    values = np.random.default_rng(0).random(rows)  # as in reliability_worker.store_loop
    rng = np.random.default_rng(11)
    kills, mid_write, versions = 0, 0, set()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    while (kills < least or mid_write < 2) and kills < most:
        kills += 1
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), "--store-loop", str(tmp_path), str(rows)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
        assert proc.stdout.readline().startswith("wrote ")  # one whole version is in place
        time.sleep(rng.uniform(0.0, 0.2))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        orphans = temp_files(tmp_path)
        # the earlier writers' temp files were swept by this one; at most its own interrupted one is left
        assert all(f".{proc.pid}." in p.name for p in orphans), orphans
        mid_write += bool(orphans)
        frame = store.read("loop", LOOP_KEY)
        assert len(frame) == rows and frame["version"].nunique() == 1, "mixed versions"
        version = int(frame["version"].iloc[0])
        assert np.array_equal(frame["row"].to_numpy(), np.arange(rows))
        assert np.array_equal(frame["value"].to_numpy(), values + version)
        versions.add(version)
    store.write("loop", "loop:layer_1/x", frame.head(3))  # any later write to the table sweeps
    assert temp_files(tmp_path) == []
    assert mid_write >= 2, f"only {mid_write} of {kills} kills landed inside a write"
    COUNTS["kill_loop"] = {
        "writers_killed": kills,
        "killed_mid_write": mid_write,
        "versions_seen": sorted(versions),
        "rows_checked": kills * rows,
    }


def test_sigkill_of_a_run_mid_write_leaves_whole_files_and_a_rerun_matches(scenario, keys):
    sc, key = scenario, keys[0]
    mine = {name for name in sc.expected if name.endswith(key_file(key))}  # this partition's files
    # at the kill: every file there, readable, holding one whole version (old and new rows are equal here)
    assert set(sc.at_kill) == set(sc.expected)
    assert sc.unreadable_or_mixed == {}
    replaced = {name for name, ino in sc.at_kill.items() if ino != sc.seeded[name]}
    assert {f"{t}/{key_file(key)}" for t in ("sae_features", "circuit_stats", "output_lens_tokens")} <= replaced
    assert f"output_lens_stats/{key_file(key)}" not in replaced
    assert [p.parent.name for p in sc.orphans_at_kill] == ["output_lens_stats"]  # the interrupted write
    assert sc.other_files_at_kill == []  # no journal or partial file besides
    assert sc.view_counts_at_kill == {
        t: sum(len(f) for n, f in sc.expected.items() if n.split("/")[0] == t) for t in sc.view_counts_at_kill
    }

    # a plain rerun waited on the `compute` pool slot the killed run still held; the recovering one completed
    assert sc.blocked_on_pool
    assert sc.rcs[0] == 0, sc.runs[0].stderr()[-5000:]
    recovered = re.findall(r"^recovered ", sc.runs[0].stdout(), re.M)
    assert len(recovered) == 2  # the killed run and the blocked one

    assert temp_files(sc.data) == []  # the interrupted write's temp file was swept
    files = parquet_files(sc.data)
    rows = 0
    for name in sc.expected:
        if name in mine:
            assert files[name].stat().st_ino not in (sc.seeded[name], sc.before_rerun[name]), f"{name}: not rewritten"
        frame = read(files[name])
        assert_identical(frame, sc.expected[name], f"rerun vs uninterrupted run: {name}")
        rows += len(frame)
    COUNTS["crash_run"] = {
        "runs_killed": 2,
        "partition_tables": len(mine),
        "replaced_before_kill": len(replaced & mine),
        "old_at_kill": len(mine - replaced),
        "orphans_at_kill": len(sc.orphans_at_kill),
        "orphans_after_rerun": 0,
        "dead_runs_recovered": len(recovered),
        "files_compared": len(sc.expected),
        "rows_compared": rows,
    }


# ---------------------------------------------------------------- concurrency


def expected_rows(planted_cache: Path, key: str) -> dict[str, int]:
    """Rows per table of one partition under the worker's settings, from the SAE width and the model."""
    ref = parse_key(key)
    d_sae = int(re.search(r"width_(\d+)", ref.sae_id).group(1))
    _, checkpoint = fetch_model(RELEASE, Hub(cache_dir=planted_cache, offline=True))
    circuits = len(
        all_circuits(checkpoint.geometry, paired_layers(ref.layer, checkpoint.geometry.n_layers), CIRCUIT_SETS["used"])
    )
    lens = 2 * (d_sae + COMPUTE["null_directions"])  # features, their control, the isotropic and the matched null
    return {
        "sae_features": d_sae,
        "feature_classes": d_sae,
        "output_lens_stats": lens,
        "input_lens_stats": lens,
        "output_lens_tokens": lens * (CANDIDATES + TOP_K),
        "input_lens_tokens": lens * (CANDIDATES + TOP_K),
        "circuit_stats": (2 * d_sae + COMPUTE["circuit_null_directions"]) * circuits,
    }


UNIQUE_KEYS = {
    "sae_features": "feature",
    "feature_classes": "feature",
    "output_lens_stats": "sample, feature",
    "input_lens_stats": "sample, feature",
    "output_lens_tokens": "sample, feature, side, rank",
    "input_lens_tokens": "sample, feature, side, rank",
    "circuit_stats": "sample, feature, phase, kind, attn_layer, head",
}


def test_two_runs_at_once_with_an_outside_reader(scenario, reference, planted_cache, keys):
    sc, reader = scenario, scenario.reader
    assert sc.rcs == [0, 0], [run.stderr()[-3000:] for run in sc.runs]
    assert reader.errors == [], reader.errors[:3]
    assert reader.rounds >= 5
    ids = [parse_key(k).sae_id for k in keys]
    before = {name: len(frame) for name, frame in sc.expected.items()}
    for (table, sae_id), ns in reader.seen.items():
        if sae_id == ids[0]:  # killed, rerun, rewritten while read: always the whole partition
            assert ns == {before[f"{table}/{key_file(keys[0])}"]}, (table, ns)
        else:  # new partition: absent or whole, never part of it
            assert ns <= {reader.final[(table, sae_id)]}, (table, sae_id, ns)

    store = TableStore(sc.data)
    tables = partition_tables(reference, keys[0])
    assert partition_tables(sc.data, keys[1]) == tables
    counted = 0
    with duckdb.connect(str(store.db_path), read_only=True) as con:
        for key, sae_id in zip(keys, ids):
            expected = expected_rows(planted_cache, key)
            for table in tables:
                n = con.execute(f'SELECT count(*) FROM "{table}" WHERE sae_id = ?', [sae_id]).fetchone()[0]
                # no lost or duplicated rows: the formula where the shapes fix it, else the reference's count
                assert n == expected.get(table, before[f"{table}/{key_file(keys[0])}"]), (table, key, n)
                assert reader.final[(table, sae_id)] == n
                if table in UNIQUE_KEYS:
                    distinct = con.execute(
                        f'SELECT count(*) FROM (SELECT DISTINCT {UNIQUE_KEYS[table]} FROM "{table}" WHERE sae_id = ?)',
                        [sae_id],
                    ).fetchone()[0]
                    assert distinct == n, f"{table} {key}: duplicated rows"
                counted += n
    assert store.keys("sae_features") == sorted(keys)
    assert temp_files(sc.data) == []
    COUNTS["concurrency"] = {
        "concurrent_runs": len(sc.runs),
        "reader_rounds": reader.rounds,
        "reader_queries": reader.queries,
        "reader_errors": len(reader.errors),
        "tables": len(tables),
        "rows_checked": counted,
        "wall_seconds": round(sc.seconds, 1),
    }


# ---------------------------------------------------------------- disk full / read-only / not a directory


def mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def fill(folder: Path) -> None:
    """Write until the filesystem is full (large blocks, then the last partial ones)."""
    for i, block in enumerate((65536, 512)):
        with open(folder / f"filler{i}", "wb", buffering=0) as fh:
            try:
                while True:
                    fh.write(b"\0" * block)
            except OSError as error:
                assert error.errno == errno.ENOSPC


def snapshot(data: Path) -> dict[str, bytes]:
    return {str(p.relative_to(data)): p.read_bytes() for p in sorted(data.rglob("*")) if p.is_file()}


def test_disk_full_and_read_only_data_dir_fail_clearly_and_keep_rows(reference, planted_cache, work, keys):
    full_fs, ro_fs = work / "full-fs", work / "ro-fs"
    if not mount_tmpfs(full_fs, "16m"):
        if os.geteuid() == 0:
            pytest.skip(
                "running as root without permission to mount a tmpfs: chmod does not stop root and no "
                "full filesystem can be made; only the data-dir-under-a-file case is tested"
            )
        pytest.skip("cannot mount a tmpfs (not root); test_unwritable_dir tests a chmod-ed dir instead")
    try:
        assert mount_tmpfs(ro_fs, "16m")
        full, ro = full_fs / "data", ro_fs / "data"
        for data in (full, ro):
            seed(data, reference)
        before = {data: snapshot(data) for data in (full, ro)}
        fill(full_fs)
        assert subprocess.run(["mount", "-o", "remount,ro", str(ro_fs)]).returncode == 0
        runs = {
            full: start(work, "disk-full", new_home(work / "full-home"), planted_cache, full, [keys[0]]),
            ro: start(work, "read-only", new_home(work / "ro-home"), planted_cache, ro, [keys[0]]),
        }
        for data, problem in ((full, "No space left on device"), (ro, "Read-only file system")):
            run = runs[data]
            assert finish(run) == 3, run.stderr()[-3000:]
            sae_file = TableStore(data).file("sae_features", keys[0])
            assert f"{sae_file}: cannot store table 'sae_features'" in run.stderr(), run.stderr()[-3000:]
            assert problem in run.stderr()
            assert snapshot(data) == before[data] and temp_files(data) == []  # nothing changed, no half-file
            with duckdb.connect(str(data / "results.duckdb"), read_only=True) as con:
                assert con.execute("SELECT count(*) FROM sae_features").fetchone()[0] == len(read(sae_file))
        COUNTS["disk"] = {"failed_runs": 2, "files_unchanged": sum(len(b) for b in before.values())}
    finally:
        for mnt in (full_fs, ro_fs):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_data_dir_under_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "not-a-dir").write_text("x")
    store = TableStore(tmp_path / "not-a-dir" / "data")
    with pytest.raises(StorageError, match="Not a directory") as info:
        store.write("t", "rel:layer_0/a", pd.DataFrame({"x": [1]}))
    assert str(store.file("t", "rel:layer_0/a")) in str(info.value)
    COUNTS.setdefault("bad_paths", {})["under_a_file"] = 1


def test_unwritable_dir(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root: chmod does not stop root; the read-only tmpfs run covers an unwritable data dir")
    store = TableStore(tmp_path)
    store.write("t", "rel:layer_0/a", pd.DataFrame({"x": [1, 2]}))
    (tmp_path / "tables" / "t").chmod(0o555)
    try:
        with pytest.raises(StorageError, match="Permission denied"):
            store.write("t", "rel:layer_0/a", pd.DataFrame({"x": [3]}))
    finally:
        (tmp_path / "tables" / "t").chmod(0o755)
    assert store.read("t", "rel:layer_0/a")["x"].tolist() == [1, 2]
    COUNTS.setdefault("bad_paths", {})["unwritable"] = 1


# ---------------------------------------------------------------- canary token


def canary_hits(root: Path) -> tuple[list[str], dict[str, int]]:
    """Files under ``root`` holding the canary: raw bytes of every file, plus every decoded value and the
    key-value metadata of Parquet files (compressed pages hide strings from a byte scan)."""
    needle = CANARY.encode()
    hits, scanned = [], {"files": 0, "parquet": 0, "sqlite": 0, "duckdb": 0, "logs": 0, "reports": 0}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        scanned["files"] += 1
        if needle in path.read_bytes():
            hits.append(str(path))
        if path.suffix == ".parquet":
            scanned["parquet"] += 1
            with duckdb.connect() as con:
                frame = con.execute("SELECT * FROM read_parquet(?)", [str(path)]).df()
                meta = con.execute("SELECT * FROM parquet_kv_metadata(?)", [str(path)]).df()
            if CANARY in frame.astype(str).to_csv() or CANARY in meta.astype(str).to_csv():
                hits.append(f"{path} (decoded)")
        scanned["sqlite"] += path.suffix == ".db"
        scanned["duckdb"] += path.suffix == ".duckdb"
        scanned["logs"] += path.suffix in (".out", ".err", ".log")
        scanned["reports"] += path.suffix == ".md"
    return hits, scanned


def test_canary_token_is_in_no_file_the_runs_leave(reference, reference_started, scenario, work, tmp_path):
    # the scanner finds the canary where it is, even inside a compressed Parquet column
    TableStore(tmp_path).write("t", "rel:layer_0/a", pd.DataFrame({"s": [f"x{CANARY}y"] * 1000}))
    assert any("(decoded)" in hit for hit in canary_hits(tmp_path)[0])
    runs = [reference_started, *scenario.runs]
    for run in runs:
        assert "hf token visible" in run.stdout()  # the runs did have the token

    hits, scanned = canary_hits(work)  # every instance, log, data dir and report of this module
    assert hits == []
    assert scanned["parquet"] >= 24 and scanned["sqlite"] >= 4 and scanned["duckdb"] >= 2 and scanned["reports"] >= 1
    with duckdb.connect(str(reference / "results.duckdb"), read_only=True) as con:
        assert CANARY not in str(con.execute("SELECT sql FROM duckdb_views()").fetchall())
    COUNTS["canary"] = {
        "worker_processes_with_token": len(list((work / "logs").glob("*.out"))),
        "completed_runs_with_token": len(runs),
        **{f"{k}_scanned": v for k, v in scanned.items()},
    }


# ---------------------------------------------------------------- determinism


def test_same_partition_twice_gives_bitwise_identical_tables(reference, scenario, keys):
    """The reference run and the scenario's rerun: separate processes, instances and data dirs."""
    first = {n: p for n, p in parquet_files(reference).items() if n.endswith(key_file(keys[0]))}
    second = parquet_files(scenario.data)
    assert len(first) >= 7
    rows, same_bytes = 0, 0
    for name, path in first.items():
        assert second[name].stat().st_ino not in (scenario.seeded[name], scenario.before_rerun[name]), name
        a, b = read(path), read(second[name])
        assert_identical(a, b, name)
        rows += len(a)
        same_bytes += path.read_bytes() == second[name].read_bytes()
    COUNTS["determinism"] = {
        "materialisations_compared": 2,
        "tables": len(first),
        "rows_compared": rows,
        "files_byte_identical": same_bytes,
    }
