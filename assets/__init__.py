"""Thin Dagster assets over ``core``: each calls the library and attaches metadata."""
