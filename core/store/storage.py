"""Result tables: one Parquet file per (table, SAE) written atomically, exposed as DuckDB views.

Layout under a data directory ``root``::

    root/tables/<table>/<quoted partition key>.parquet   one file per SAE (or per release)
    root/results.duckdb                                   views: one per table over its Parquet files

Why Parquet + views rather than tables inside the DuckDB file: DuckDB allows one writing process per
file, and an analyst holding ``results.duckdb`` open in a notebook would otherwise block (or crash)
every materialisation. Here a materialisation only writes its own Parquet file — atomically
(``core.store.atomic``) — so readers see the old file or the new one, never a half
file, and two partitions never touch the same file. The views are (re)created when a new table appears;
if another process holds the database at that moment the refresh is skipped and retried on the next
write (views glob the directory, so new partitions show up without a refresh).

Which DuckDB opens the file: it is written in storage format ``STORAGE_VERSION`` (v1.0.0, DuckDB's
storage version 64), not the writing library's newest — duckdb 2.x would write version 69, which the
DuckDB CLI of the 1.5 line and Python duckdb 1.x refuse ("can only read versions between 64 and 68").
A database already at another version is rebuilt on the next refresh.

Where the views read: paths relative to the database file, so a data directory that is moved or copied
reads its own tables, never the old location's. DuckDB resolves a relative path against the working
directory, and no SQL function names a database's file; but the default ``temp_directory`` of a
connection opened on a database file is that file's path plus ``.tmp``, so each view takes its directory
from there (``DATA_DIR_SQL``). Opening ``results.duckdb`` directly, from any directory, therefore works::

    duckdb -readonly data/results.duckdb -c "SELECT count(*) FROM feature_classes"

When that default does not apply (``temp_directory`` set by hand, or the file ATTACHed to another
database) the paths stay relative — ``tables/<table>/*.parquet`` — and resolve against DuckDB's
``file_search_path`` or the working directory: ``SET file_search_path = 'data'`` or run from inside the
data directory.

A writer killed between writing its temporary file and the rename (SIGKILL, power loss) leaves that
file behind; the next write on the same host to the same table removes that host's ones whose process is
gone (``core.store.atomic.sweep_orphans``). A write that
fails (disk full, read-only or unwritable directory) raises ``StorageError`` naming the destination
file; the partition's previously stored file is untouched.

Every table carries ``release`` and ``sae_id`` columns, so ``SELECT ... WHERE release = ...`` works
across files.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from urllib.parse import quote, unquote

import duckdb
import numpy as np
import pandas as pd

from core.store.atomic import atomic_path, sweep_orphans, temporary_name

DB_FILE = "results.duckdb"
STORAGE_VERSION = "v1.0.0"  # storage version 64: read by every DuckDB since 0.10, the 1.5 CLI included
# An appender's staging database spills past this (DuckDB's default is 80 % of the machine's memory, which it
# would take as buffer pool while a stage's own tensors need it); one thread: appends are small and serial. Its
# buffer pool fills to the limit as rows arrive, so the limit is what streaming costs: 64 MB holds a 65k SAE's
# 133k rows per circuit (benchmarks/circuit_rows_memory.py); 32 MB runs out of memory.
STAGING_MEMORY = "64MB"
READ_ROWS = 64 * 2048  # rows fetched at a time by TableStore.read (DuckDB hands out vectors of 2048 rows)
WRITE_CONFIG: dict[str, str | bool | int | float | list[str]] = {"storage_compatibility_version": STORAGE_VERSION}
# The directory of the database file, with its trailing separator ('' when it cannot be told: paths stay
# relative). The default temp_directory of a connection on <dir>/results.duckdb is <dir>/results.duckdb.tmp.
DATA_DIR_SQL = f"regexp_extract(current_setting('temp_directory'), '^(.*[/\\\\])?{re.escape(DB_FILE + '.tmp')}$', 1)"


class StorageError(OSError):
    """A partition's rows could not be stored; names the destination file, and the cause."""


class TableStore:
    """Parquet tables under ``root/tables`` and their DuckDB views in ``root/results.duckdb``."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()
        self.tables_dir = self.root / "tables"
        self.db_path = self.root / DB_FILE

    def file(self, table: str, key: str) -> Path:
        """Where the rows of one partition key live."""
        return self.tables_dir / table / f"{quote(key, safe='')}.parquet"

    def write(self, table: str, key: str, frame: pd.DataFrame) -> Path:
        """Replace a partition's rows atomically (temp file + rename); other partitions are untouched."""
        path = self.file(table, key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            sweep_orphans(path.parent)
            with atomic_path(path) as tmp, _memory() as con:
                con.register("frame", frame)
                con.execute(f"COPY frame TO '{_sql_path(tmp)}' (FORMAT parquet)")
        except (OSError, duckdb.Error) as error:
            raise _storage_error(path, table, key, error) from error
        return path

    @contextlib.contextmanager
    def appender(self, table: str, key: str) -> Iterator[Callable[[pd.DataFrame], None]]:
        """Replace a partition's rows with frames appended one by one as they are produced, in memory that does
        not grow with their number: each frame goes to a staging DuckDB file beside the table (on disk; DuckDB
        spills, nothing is held in Python), and on a clean exit the staged rows are copied to the partition's
        Parquet file in one streaming ``COPY`` and renamed into place (``core.store.atomic``). Every frame must have
        the first one's columns. On an error nothing is stored and the previous rows stay; a ``StorageError``
        names the file, as ``write`` does. No frame at all stores an empty table."""
        path = self.file(table, key)
        staging = temporary_name(path.with_suffix(".staging"))
        created = False
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            sweep_orphans(path.parent)
            con = duckdb.connect(str(staging), config={"memory_limit": STAGING_MEMORY, "threads": 1})
        except (OSError, duckdb.Error) as error:
            raise _storage_error(path, table, key, error) from error
        try:

            def append(frame: pd.DataFrame) -> None:
                nonlocal created
                con.register("part", frame)
                con.execute(
                    "INSERT INTO rows SELECT * FROM part" if created else "CREATE TABLE rows AS SELECT * FROM part"
                )
                con.unregister("part")
                created = True

            yield append
            try:
                with atomic_path(path) as tmp:
                    source = "rows" if created else "(SELECT 1 AS empty WHERE false)"
                    con.execute(f"COPY {source} TO '{_sql_path(tmp)}' (FORMAT parquet)")
            except (OSError, duckdb.Error) as error:
                raise _storage_error(path, table, key, error) from error
        finally:
            con.close()
            for leftover in (staging, staging.with_name(staging.name + ".wal")):
                with contextlib.suppress(OSError):
                    leftover.unlink(missing_ok=True)

    def read(self, table: str, key: str | None = None, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """One partition's rows, or all of the table's rows when ``key`` is None (empty if none); ``columns``: only
        these, in this order (every column when None).

        Fetched ``READ_ROWS`` rows at a time, each repeated string stored once (``_share_strings``): pandas holds a
        string cell as a pointer to a Python object, and DuckDB makes one object per cell, ~70 bytes for a short
        string. A lens table of Gemma-2-2B (2.1M rows, six string columns of a few distinct values or a
        vocabulary's tokens) then takes ~0.2 GiB instead of ~1 GiB, with the same frame."""
        if key is not None:
            path = self.file(table, key)
            if not path.exists():
                raise FileNotFoundError(f"{path}: no rows stored for {key!r} in table {table!r}")
            pattern = path
        else:
            if not list((self.tables_dir / table).glob("*.parquet")):
                return pd.DataFrame()
            pattern = self.tables_dir / table / "*.parquet"
        select = ", ".join(f'"{name}"' for name in columns) if columns else "*"
        with _memory() as con:
            result = con.execute(f"SELECT {select} FROM read_parquet('{_sql_path(pattern)}', union_by_name=true)")
            shared: dict[str, str] = {}
            chunks = [_share_strings(result.fetch_df_chunk(READ_ROWS // 2048), shared)]
            while len(chunk := result.fetch_df_chunk(READ_ROWS // 2048)):
                chunks.append(_share_strings(chunk, shared))
        return chunks[0] if len(chunks) == 1 else pd.concat(chunks, ignore_index=True)

    def keys(self, table: str) -> list[str]:
        """Partition keys with stored rows in ``table``."""
        return sorted(unquote(p.stem) for p in (self.tables_dir / table).glob("*.parquet"))

    def tables(self) -> list[str]:
        """Tables that have at least one stored partition."""
        if not self.tables_dir.exists():
            return []
        return sorted(d.name for d in self.tables_dir.iterdir() if d.is_dir() and any(d.glob("*.parquet")))

    def refresh_views(self, attempts: int = 5, wait_s: float = 0.2) -> bool:
        """(Re)create ``results.duckdb`` with one view per table. Returns False, leaving the database as it
        was, when another process holds it (the next write retries). When every table already has its view
        in the current storage format (the usual case: a new partition of a known table) nothing is
        written, so a reader holding the database open costs a writer nothing."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self._views_current():
            return True
        for attempt in range(attempts):
            try:
                lock = duckdb.connect(str(self.db_path), config=WRITE_CONFIG)
            except duckdb.IOException:
                time.sleep(wait_s * (attempt + 1))
                continue
            try:
                self._rebuild()
            finally:
                lock.close()
            return True
        return False

    def _rebuild(self) -> None:
        """Write a new database with every table's view beside the old one and rename it over it. Called
        holding a read-write connection on the old file — DuckDB's lock that no other process has it open,
        so none is left writing (or keeping a write-ahead log) for a file that is gone. A new file rather
        than views replaced in place, because an existing file keeps its storage version."""
        sweep_orphans(self.root)
        with atomic_path(self.db_path) as tmp:
            # The file is not yet named results.duckdb, so DATA_DIR_SQL gives '' here: the search path
            # resolves the relative paths while each view is bound (checked) on creation.
            con = duckdb.connect(str(tmp), config={**WRITE_CONFIG, "file_search_path": str(self.root)})
            try:
                for table in self.tables():
                    con.execute(
                        f'CREATE VIEW "{table}" AS SELECT * FROM '
                        f"read_parquet({DATA_DIR_SQL} || '{_relative_glob(table)}', union_by_name=true)"
                    )
            finally:
                con.close()

    def _views_current(self) -> bool:
        """Whether the database is in ``STORAGE_VERSION``'s format and every stored table has its view
        relative to the database file (checked read-only, which other readers do not block)."""
        if not self.db_path.exists():
            return False
        try:
            con = duckdb.connect(str(self.db_path), read_only=True)
        except duckdb.Error:
            return False
        try:
            row = con.execute(
                "SELECT tags['storage_version'] FROM duckdb_databases() WHERE database_name = current_database()"
            ).fetchone()
            version = None if row is None else row[0]
            views = dict(con.execute("SELECT view_name, sql FROM duckdb_views() WHERE NOT internal").fetchall())
        finally:
            con.close()
        return str(version).startswith(STORAGE_VERSION) and all(
            "temp_directory" in views.get(table, "") and f"'{_relative_glob(table)}'" in views[table]
            for table in self.tables()
        )

    def connect(self, read_only: bool = True) -> duckdb.DuckDBPyConnection:
        """A DuckDB connection to the views (read-only by default, so it never blocks writers' refresh
        for longer than it is open)."""
        return duckdb.connect(str(self.db_path), read_only=read_only)


def _storage_error(path: Path, table: str, key: str, error: Exception) -> StorageError:
    """The ``StorageError`` of a failed write of ``table``'s rows for ``key`` to ``path``."""
    message = f"{path}: cannot store table {table!r} for {key!r} ({error}); previously stored rows are unchanged"
    errno = getattr(error, "errno", None)
    return StorageError(errno, message) if isinstance(errno, int) else StorageError(message)


def _relative_glob(table: str) -> str:
    """A table's Parquet files relative to the data directory, as a single-quoted SQL string body."""
    return _sql_path(Path("tables") / table / "*.parquet")


_MEMORY: tuple[int, duckdb.DuckDBPyConnection] | None = None  # (pid, this process's in-memory DuckDB)
_MEMORY_LOCK = threading.Lock()


def _memory() -> duckdb.DuckDBPyConnection:
    """A new cursor of this process's in-memory DuckDB, through which every Parquet file is read and written: opening
    a database costs ~35 ms, a cursor ~10 µs (a chain stores hundreds of tables). A cursor per use, so threads never
    share one; a database per process id, so a forked child never uses its parent's (DuckDB's threads do not
    survive a fork)."""
    global _MEMORY
    with _MEMORY_LOCK:
        if _MEMORY is None or _MEMORY[0] != os.getpid():
            _MEMORY = (os.getpid(), duckdb.connect())
        return _MEMORY[1].cursor()


def _share_strings(frame: pd.DataFrame, shared: dict[str, str]) -> pd.DataFrame:
    """``frame`` with every string cell replaced, in place, by the one object ``shared`` holds for that value (added
    when new): equal values, one object. Columns of other objects (lists) and missing values are left as they are."""
    for name in frame.select_dtypes(object).columns:
        values = frame[name].to_numpy()
        if pd.api.types.infer_dtype(values, skipna=True) != "string":
            continue
        codes, uniques = pd.factorize(values)
        present = codes >= 0
        values[present] = np.array([shared.setdefault(u, u) for u in uniques], dtype=object)[codes[present]]
        frame[name] = values
    return frame


def _sql_path(path: Path) -> str:
    """A path as a single-quoted SQL string body."""
    return str(path).replace("'", "''")
