"""Outgrowing one machine: PostgreSQL instance storage + the Celery executor with a Redis broker.

Installs what is missing (Debian ``postgresql`` / ``redis-server`` via apt-get, the ``cluster`` extra via
pip), starts PostgreSQL and Redis on 127.0.0.1 (temporary data dirs, free non-default ports; PostgreSQL as
the ``postgres`` user when root) and two Celery workers (dagster-celery's CLI, with the shipped
``deploy/celery/worker.yaml``), and materialises three planted-gemma SAE partitions through
``python -m orchestration.cluster run-partitions`` (three runs in flight at once, an instance from the
shipped ``deploy/celery/dagster.yaml``), with the full layer × head circuit sweep (``circuit_layers="all"``)
so that each compute step lasts seconds and the runs contend for the pool. Then, from the PostgreSQL event
log and the worker logs:

- every step ran in a Celery worker, not in the run's process, and both workers executed steps;
- the ``compute`` pool (limit 1) still held across runs and workers: no two ``compute`` steps overlapped
  in time (step start/success events), and compute steps that were ready before another one ended were
  only submitted to Celery after it ended (they waited for the pool, not for a worker);
- then the release statistics, plots and report run on the workers too (``--report``: one more run), read
  what the partitions stored (no pickled hand-off: no run or worker log mentions Dagster's pickling IO
  manager);
- the tables (Parquet, every table of the partitions and of the release), the Neuronpedia JSON exports, the
  report's text and its plots equal those of a single-process run of the same partitions with the same
  resources.

The prerequisites (Debian ``postgresql`` / ``redis-server``, the ``cluster`` extra) are installed before pytest
by ``python scripts/local_cluster.py install`` (``scripts/test.sh`` runs it); where they are missing this test
fails naming them and that command, and where the services fail it fails with the server's output — never skips.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pandas as pd
import pytest
import yaml

from core.store.storage import TableStore
from core.weights.discovery import discover_saes
from orchestration.cli import materialize_all
from orchestration.jobs import REPORT_ASSETS, SAE_ASSETS
from orchestration.partitions import sae_partitions
from scripts.local_cluster import celery_workers, init_instance, missing_prerequisites, postgres, redis
from tests.planted_chain import chain_resources

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[1]
COMPUTE_STEPS = {"lens_tables", "circuit_tables"}  # pool="compute" (assets/interactions.py)
WEIGHT_STEPS = {"sae_weights", "model_weights"}  # what the compute steps depend on
WORKERS = 2
PARTITIONS = 3  # runs in flight at once: enough to contend for the compute pool


RUN_START = "PIPELINE_START"  # DagsterEventType.RUN_START's value


def event_rows(instance, run_id: str) -> list[dict]:
    rows = []
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None:
            continue
        metadata = {}
        if event.event_type_value == "ENGINE_EVENT" and event.engine_event_data is not None:
            metadata = {k: getattr(v, "value", v) for k, v in (event.engine_event_data.metadata or {}).items()}
        rows.append(
            dict(
                run_id=run_id,
                type=event.event_type_value,
                step=event.step_key,
                t=entry.timestamp,
                pid=event.pid,
                message=event.message or "",
                metadata=metadata,
            )
        )
    return rows


def overlaps(intervals: list[tuple[float, float, str]]) -> list[tuple[str, str]]:
    ordered = sorted(intervals)
    return [(a[2], b[2]) for a, b in zip(ordered, ordered[1:]) if b[0] < a[1]]


def test_celery_workers_on_postgres_spread_partitions_keep_the_pool_and_match_single_process(
    planted_cache, tmp_path, monkeypatch
):
    timings, t0 = {}, time.monotonic()
    missing = missing_prerequisites()
    assert not missing, f"missing {', '.join(missing)}: run `python scripts/local_cluster.py install` first"

    import dagster as dg

    from orchestration.cluster import resource_config

    home, data, reference_dir = tmp_path / "dagster_home", tmp_path / "data", tmp_path / "reference"
    # The session chain's test-sized resources with every layer's attention, single-process and on Celery, for
    # the first PARTITIONS SAEs of planted-gemma, the only partitions registered in either instance.
    t = time.monotonic()
    resources = chain_resources(planted_cache, reference_dir, circuit_layers="all")
    reference = dg.DagsterInstance.ephemeral()
    keys = [ref.key for ref in discover_saes("planted-gemma", resources["hub"].client()).saes[:PARTITIONS]]
    reference.add_dynamic_partitions(sae_partitions.name, keys)
    materialize_all(reference, keys, resources)
    timings["reference"] = time.monotonic() - t

    home.mkdir()
    shutil.copy(ROOT / "deploy" / "celery" / "dagster.yaml", home / "dagster.yaml")
    worker_config = ROOT / "deploy" / "celery" / "worker.yaml"
    resources_yaml = tmp_path / "resources.yaml"
    resources_yaml.write_text(
        yaml.safe_dump(resource_config(chain_resources(planted_cache, data, circuit_layers="all")))
    )

    service_parent = Path("/tmp")  # pytest's tmp dirs are private to root; the postgres user must reach its dir
    t = time.monotonic()
    with postgres(service_parent) as pg, redis(service_parent) as broker:
        env = {
            **os.environ,
            **pg.env(),
            "DAGSTER_HOME": str(home),
            "HF_HUB_OFFLINE": "1",
            "WEIGHTLENS_CELERY_BROKER": broker.url(0),
            "WEIGHTLENS_CELERY_BACKEND": broker.url(1),
            "PYTHONPATH": str(ROOT),
        }
        timings["services"] = time.monotonic() - t
        t = time.monotonic()
        init_instance(env)  # the schema, once: processes creating it at the same moment collide
        with celery_workers(WORKERS, worker_config, env, tmp_path / "workers") as workers:
            timings["workers_ready"] = time.monotonic() - t
            t = time.monotonic()
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "orchestration.cluster",
                    "run-partitions",
                    "-c",
                    str(resources_yaml),
                    "--parallel",
                    str(len(keys)),
                    "--log-dir",
                    str(tmp_path / "runs"),
                    "--report",
                    *keys,
                ],
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=1200,
            )
            timings["runs"] = time.monotonic() - t
            worker_logs = {w.node: w.log.read_text(errors="replace") for w in workers}
        full_run_logs = {p: p.read_text(errors="replace") for p in sorted((tmp_path / "runs").rglob("*.log"))}
        run_logs = "\n".join(text[-4000:] for text in full_run_logs.values())
        assert done.returncode == 0, (
            f"{done.stderr[-3000:]}\n--- run logs ---\n{run_logs}\n--- workers ---\n"
            + "\n".join(log[-3000:] for log in worker_logs.values())
        )

        # What the PostgreSQL instance recorded.
        for name, value in pg.env().items():
            monkeypatch.setenv(name, value)
        with dg.DagsterInstance.from_config(str(home)) as instance:
            assert "Postgres" in type(instance.run_storage).__name__
            all_runs = instance.get_runs()
            by_key = {run.tags.get("dagster/partition"): run for run in all_runs}
            assert sorted(by_key, key=str) == sorted([*keys, None], key=str) and len(all_runs) == len(keys) + 1
            assert all(run.status == dg.DagsterRunStatus.SUCCESS for run in all_runs)
            events = [row for run in all_runs for row in event_rows(instance, run.run_id)]
            runs = [by_key[key] for key in keys]
            report_run = by_key[None]

    # Every step ran in a worker (not the run's orchestrating process), and both workers took steps.
    orchestrator_pid = {r["run_id"]: r["pid"] for r in events if r["type"] == RUN_START}
    starts = [r for r in events if r["type"] == "STEP_START"]
    report_steps = [r for r in starts if r["run_id"] == report_run.run_id]
    assert len(starts) - len(report_steps) == len(SAE_ASSETS) * len(keys) and len(report_steps) == len(REPORT_ASSETS)
    assert all(r["pid"] != orchestrator_pid[r["run_id"]] for r in starts)
    handed = [
        r for r in events if r["type"] == "ENGINE_EVENT" and "Celery worker" in r["metadata"]
    ]  # the worker's "Executing steps"
    steps_by_worker = defaultdict(list)
    for r in handed:
        steps_by_worker[r["metadata"]["Celery worker"]].append(f"{r['run_id'][:8]}:{r['step']}")
    assert len(handed) == len(starts)
    assert set(steps_by_worker) == set(worker_logs), steps_by_worker
    for node, log in worker_logs.items():  # celery's own record of the tasks each worker ran
        assert len(re.findall(r"Task execute_plan\[[0-9a-f-]+\] succeeded in", log)) == len(steps_by_worker[node]), node

    # The compute pool (limit 1) held across the three runs and two workers.
    ends = {(r["run_id"], r["step"]): r["t"] for r in events if r["type"] == "STEP_SUCCESS"}
    intervals = [
        (r["t"], ends[(r["run_id"], r["step"])], f"{r['run_id'][:8]}:{r['step']}")
        for r in starts
        if r["step"] in COMPUTE_STEPS
    ]
    assert len(intervals) == len(COMPUTE_STEPS) * len(keys)
    assert overlaps(intervals) == []
    # And it gated them: the Celery executor submits every ready step at once (submission does not wait for a
    # free worker), so a compute step that was ready (both weights steps of its run done) before another
    # compute step ended, and was submitted only after that one ended, waited for the pool's slot.
    ready = {
        run.run_id: max(
            r["t"]
            for r in events
            if r["run_id"] == run.run_id and r["type"] == "STEP_SUCCESS" and r["step"] in WEIGHT_STEPS
        )
        for run in runs
    }
    submitted = {
        (r["run_id"], r["step"]): r["t"]
        for r in events
        if r["type"] == "ENGINE_EVENT" and r["message"].startswith("Submitting celery task")
    }
    waited = sorted(
        {
            f"{r['run_id'][:8]}:{r['step']}"
            for r in starts
            if r["step"] in COMPUTE_STEPS
            for _, end, other in intervals
            if other != f"{r['run_id'][:8]}:{r['step']}"
            and ready[r["run_id"]] < end <= submitted[(r["run_id"], r["step"])]
        }
    )
    timeline = sorted(
        [(t, f"{run_id[:8]} weights done") for run_id, t in ready.items()]
        + [(a, f"{name} start") for a, _, name in intervals]
        + [(b, f"{name} end") for _, b, name in intervals]
        + [(t, f"{run_id[:8]}:{step} submitted") for (run_id, step), t in submitted.items() if step in COMPUTE_STEPS]
    )
    assert waited, (
        "no compute step ever waited for the pool: the runs did not contend, the test proves nothing\n"
        + "\n".join(f"{t - timeline[0][0]:7.2f} {what}" for t, what in timeline)
    )
    run_windows = sorted(
        (
            min(r["t"] for r in events if r["run_id"] == run.run_id),
            max(r["t"] for r in events if r["run_id"] == run.run_id),
        )
        for run in runs
    )
    assert any(b[0] < a[1] for a, b in zip(run_windows, run_windows[1:])), "the runs never ran at the same time"

    # Results identical to the single-process run.
    reference, cluster = TableStore(reference_dir), TableStore(data)
    compared, rows, identical_bytes = 0, 0, 0
    for table_dir in sorted(p for p in reference.tables_dir.iterdir() if p.is_dir()):
        for key in [*keys, "planted-gemma"]:  # the partitions' tables and the release's (claim_statistics)
            ref_file = reference.file(table_dir.name, key)
            if not ref_file.exists():
                continue
            got_file = cluster.file(table_dir.name, key)
            assert got_file.exists(), f"{table_dir.name} for {key} missing from the cluster run"
            expected, got = reference.read(table_dir.name, key), cluster.read(table_dir.name, key)
            pd.testing.assert_frame_equal(got, expected, check_exact=True, obj=f"{table_dir.name}[{key}]")
            compared, rows = compared + 1, rows + len(got)
            identical_bytes += ref_file.read_bytes() == got_file.read_bytes()
    cluster_files = {p.relative_to(cluster.tables_dir) for p in cluster.tables_dir.glob("*/*.parquet")}
    assert compared >= 10 * len(keys) and len(cluster_files) == compared
    exports = sorted(p.relative_to(data) for p in (data / "exports").rglob("*.json"))
    assert len(exports) == len(keys)
    for rel in exports:
        assert json.loads((data / rel).read_text()) == json.loads((Path(reference_dir) / rel).read_text()), rel
    report = Path("reports") / "planted-gemma"
    drawn = sorted(p.name for p in (data / report).glob("*.png"))
    assert drawn == sorted(p.name for p in (reference_dir / report).glob("*.png")) and drawn
    assert (data / report / "report.md").read_text() == (reference_dir / report / "report.md").read_text()
    logs = [*full_run_logs.values(), *worker_logs.values()]
    assert not [log[:200] for log in logs if "PickledObjectFilesystemIOManager" in log]

    timings["total"] = time.monotonic() - t0
    summary = {
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "steps_by_worker": {k: len(v) for k, v in steps_by_worker.items()},
        "compute_steps": len(intervals),
        "compute_steps_that_waited_for_the_pool": len(waited),
        "tables_compared": compared,
        "rows_compared": rows,
        "byte_identical_files": identical_bytes,
    }
    print("cluster test:", json.dumps(summary))
    (tmp_path / "summary.json").write_text(json.dumps(summary, indent=1))
