"""Recovering from killed runs: a run whose process died (SIGKILL, OOM, a closed laptop) never reports
its end, so the instance keeps it "started" and it keeps its slot in the ``compute`` pool — every later
run would wait on that slot forever. ``fail_dead_runs`` marks such runs failed and frees their slots;
the CLI calls it before materialising."""

from __future__ import annotations

import dagster as dg

from core.store.atomic import process_alive

UNFINISHED = [dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.NOT_STARTED]


def fail_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Ids of the unfinished runs whose every recorded process is gone, now marked failed with their
    pool slots freed. Runs with a live process, or none recorded yet, are left alone (single host:
    pids are only meaningful on the machine that ran them)."""
    recovered = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=UNFINISHED)):
        pids = {e.dagster_event.pid for e in instance.all_logs(run.run_id) if e.dagster_event and e.dagster_event.pid}
        if pids and not any(process_alive(pid) for pid in pids):
            instance.report_run_failed(run, message=f"run process {sorted(pids)} is gone (killed); marked failed")
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
            recovered.append(run.run_id)
    return recovered
