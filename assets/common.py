"""What every asset does the same way: resolve its SAE, store a table, describe it in metadata."""

from pathlib import Path

import dagster as dg
import pandas as pd

from core.registry import SaeRef, parse_key
from core.table_checks import Check
from orchestration.resources import StoreResource


def sae_of(context: dg.AssetExecutionContext) -> SaeRef:
    """The SAE named by the run's partition key."""
    return parse_key(context.partition_key)


def store_table(store: StoreResource, table: str, key: str, frame: pd.DataFrame) -> dict[str, dg.MetadataValue]:
    """Write one partition's rows (atomically) and refresh the DuckDB views; return metadata saying
    where the rows are and how to query them."""
    return stored_table_metadata(store, table, store.tables().write(table, key, frame), len(frame))


def stored_table_metadata(store: StoreResource, table: str, path: Path, rows: int) -> dict[str, dg.MetadataValue]:
    """Refresh the DuckDB views after ``rows`` rows of ``table`` were stored at ``path``; the metadata saying
    where they are and how to query them."""
    tables = store.tables()
    views_ok = tables.refresh_views()
    return {
        f"{table}/rows": dg.MetadataValue.int(rows),
        f"{table}/parquet": dg.MetadataValue.path(str(path)),
        f"{table}/duckdb": dg.MetadataValue.text(
            f"{tables.db_path} view {table}" + ("" if views_ok else " (view refresh deferred: database busy)")
        ),
    }


def check_specs(asset: str, names: list[str]) -> list[dg.AssetCheckSpec]:
    """Blocking integrity checks an asset reports with each materialisation (shown in the UI)."""
    return [dg.AssetCheckSpec(name, asset=asset, blocking=True) for name in names]


def check_results(checks: list[Check]) -> list[dg.AssetCheckResult]:
    return [dg.AssetCheckResult(check_name=c.name, passed=c.passed, description=c.detail) for c in checks]
