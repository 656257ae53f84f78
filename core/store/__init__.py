"""Writing results: one atomic file write, Parquet tables with DuckDB views, table integrity checks."""
