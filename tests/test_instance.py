"""The project's dagster.yaml gives the instance the README promises."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import pytest

from orchestration.definitions import defs

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


def test_project_instance_config(tmp_path, monkeypatch):
    shutil.copy(ROOT / "dagster.yaml", tmp_path / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    with dg.DagsterInstance.get() as instance:
        settings = instance.get_settings("telemetry")
        assert settings == {"enabled": False}
        assert instance.run_retries_enabled is False
        pools = instance.get_concurrency_config().pool_config
        assert pools.default_pool_limit == 1
        # the heavy step is in that pool
        graph = defs.resolve_asset_graph()
        assert graph.get(dg.AssetKey("lens_tables")).pools == {"compute"}
        assert instance.run_monitoring_enabled  # the daemon fails hung runs and frees ended runs' slots
        assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] == 300
