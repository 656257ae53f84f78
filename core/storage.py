"""Result tables: one Parquet file per (table, SAE) written atomically, exposed as DuckDB views.

Layout under a data directory ``root``::

    root/tables/<table>/<quoted partition key>.parquet   one file per SAE (or per release)
    root/results.duckdb                                   views: one per table over its Parquet files

Why Parquet + views rather than tables inside the DuckDB file: DuckDB allows one writing process per
file, and an analyst holding ``results.duckdb`` open in a notebook would otherwise block (or crash)
every materialisation. Here a materialisation only writes its own Parquet file — atomically
(``core.atomic``) — so readers see the old file or the new one, never a half
file, and two partitions never touch the same file. The views are (re)created when a new table appears;
if another process holds the database at that moment the refresh is skipped and retried on the next
write (views glob the directory, so new partitions show up without a refresh).

A writer killed between writing its temporary file and the rename (SIGKILL, power loss) leaves that
file behind; the next write on the same host to the same table removes that host's ones whose process is
gone (``core.atomic.sweep_orphans``). A write that
fails (disk full, read-only or unwritable directory) raises ``StorageError`` naming the destination
file; the partition's previously stored file is untouched.

Every table carries ``release`` and ``sae_id`` columns, so ``SELECT ... WHERE release = ...`` works
across files.
"""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import quote, unquote

import duckdb
import pandas as pd

from core.atomic import atomic_path, sweep_orphans

DB_FILE = "results.duckdb"


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
            with atomic_path(path) as tmp:
                con = duckdb.connect()
                try:
                    con.register("frame", frame)
                    con.execute(f"COPY frame TO '{_sql_path(tmp)}' (FORMAT parquet)")
                finally:
                    con.close()
        except (OSError, duckdb.Error) as error:
            message = f"{path}: cannot store table {table!r} for {key!r} ({error}); previously stored rows are unchanged"
            errno = getattr(error, "errno", None)
            raise (StorageError(errno, message) if isinstance(errno, int) else StorageError(message)) from error
        return path

    def read(self, table: str, key: str | None = None) -> pd.DataFrame:
        """One partition's rows, or all of the table's rows when ``key`` is None (empty if none)."""
        if key is not None:
            path = self.file(table, key)
            if not path.exists():
                raise FileNotFoundError(f"{path}: no rows stored for {key!r} in table {table!r}")
            pattern = path
        else:
            if not list((self.tables_dir / table).glob("*.parquet")):
                return pd.DataFrame()
            pattern = self.tables_dir / table / "*.parquet"
        con = duckdb.connect()
        try:
            return con.execute(f"SELECT * FROM read_parquet('{_sql_path(pattern)}', union_by_name=true)").df()
        finally:
            con.close()

    def keys(self, table: str) -> list[str]:
        """Partition keys with stored rows in ``table``."""
        return sorted(unquote(p.stem) for p in (self.tables_dir / table).glob("*.parquet"))

    def tables(self) -> list[str]:
        """Tables that have at least one stored partition."""
        if not self.tables_dir.exists():
            return []
        return sorted(d.name for d in self.tables_dir.iterdir() if d.is_dir() and any(d.glob("*.parquet")))

    def refresh_views(self, attempts: int = 5, wait_s: float = 0.2) -> bool:
        """(Re)create one view per table in ``results.duckdb``. Returns False, leaving the views as they
        were, when another process holds the database (the next write retries). When every table already
        has its view (the usual case: a new partition of a known table) nothing is written, so a reader
        holding the database open costs a writer nothing."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self._views_current():
            return True
        for attempt in range(attempts):
            try:
                con = duckdb.connect(str(self.db_path))
            except duckdb.IOException:
                time.sleep(wait_s * (attempt + 1))
                continue
            try:
                for table in self.tables():
                    glob = _sql_path(self.tables_dir / table / "*.parquet")
                    con.execute(
                        f'CREATE OR REPLACE VIEW "{table}" AS '
                        f"SELECT * FROM read_parquet('{glob}', union_by_name=true)"
                    )
            finally:
                con.close()
            return True
        return False

    def _views_current(self) -> bool:
        """Whether every stored table has its view over this directory (checked read-only, which other
        readers do not block)."""
        if not self.db_path.exists():
            return False
        try:
            con = duckdb.connect(str(self.db_path), read_only=True)
        except duckdb.Error:
            return False
        try:
            views = dict(con.execute("SELECT view_name, sql FROM duckdb_views() WHERE NOT internal").fetchall())
        finally:
            con.close()
        return all(_sql_path(self.tables_dir / table / "*.parquet") in views.get(table, "") for table in self.tables())

    def connect(self, read_only: bool = True) -> duckdb.DuckDBPyConnection:
        """A DuckDB connection to the views (read-only by default, so it never blocks writers' refresh
        for longer than it is open)."""
        return duckdb.connect(str(self.db_path), read_only=read_only)


def _sql_path(path: Path) -> str:
    """A path as a single-quoted SQL string body."""
    return str(path).replace("'", "''")
