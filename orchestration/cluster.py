"""The same assets and jobs on several machines, with Dagster's own engines (optional extra ``cluster``):
instance storage on PostgreSQL (``dagster-postgres``, chosen in the instance's ``dagster.yaml``) and
every step of every job a Celery task (``dagster-celery``'s executor, Redis as broker and result
backend), executed by whichever worker takes it.

Nothing here is imported by the embedded default (``orchestration.definitions``): this module is its own
code location, ``dagster dev -m orchestration.cluster`` or ``dagster job execute -m orchestration.cluster``.

What stays the same: the asset graph, the one-partition-per-SAE runs, and the ``compute`` pool. The pool
is an instance-wide limit kept in PostgreSQL: each run's orchestrator claims a slot before it hands a
``compute`` step to Celery and the slot is freed when the step's end event is stored, so with
``default_limit: 1`` no two interaction steps run at once anywhere, whatever the number of workers
(set it to the number of GPUs). Steps outside the pool (weights, classes) run in parallel on free workers.

What every worker machine needs: this package (same version as the orchestrator), the instance's
``dagster.yaml`` (``DAGSTER_HOME``), the broker, and the data directory (``StoreResource.data_dir``) on a
shared file system; the hub cache can be per machine (weights are fetched once per machine).
See ``deploy/celery/`` and the README's "Running on a cluster".

    python -m orchestration.cluster materialize [-c deploy/celery/resources.yaml] [RELEASE ...]
    python -m orchestration.cluster run-partitions [-c resources.yaml] KEY [KEY ...]

Both register the partitions and start one run per SAE (``dagster job execute``, ``--parallel`` at a
time): each run's process only orchestrates; its steps execute in the Celery workers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import dagster as dg
from dagster_celery import celery_executor

from orchestration.cli import default_releases, register_partitions
from orchestration.definitions import resources
from orchestration.jobs import ALL_ASSETS, report_job, sae_chain_job
from orchestration.partitions import sae_partitions
from orchestration.resources import HubResource
from orchestration.sensors import sae_release_schedule, sae_release_sensor

MODULE = "orchestration.cluster"

BROKER_ENV, BACKEND_ENV = "WEIGHTLENS_CELERY_BROKER", "WEIGHTLENS_CELERY_BACKEND"

# The broker comes from the environment of each process (the same variables deploy/celery/worker.yaml
# gives the workers), so runs launched by the sensor, the UI or a backfill need no executor run config.
executor = celery_executor.configured(
    {"broker": {"env": BROKER_ENV}, "backend": {"env": BACKEND_ENV}}, name="celery_from_env"
)

defs = dg.Definitions(
    assets=ALL_ASSETS,
    jobs=[sae_chain_job, report_job],
    sensors=[sae_release_sensor],
    schedules=[sae_release_schedule],
    resources=resources(),
    # Every job of this code location (sensor runs, UI materialisations, backfills) runs its steps on Celery.
    executor=executor,
)


def resource_config(resource_objects: Mapping[str, dg.ConfigurableResource]) -> dict:
    """Run config carrying these resource values (they travel with the run: every worker uses them)."""
    return {"resources": {name: {"config": r.model_dump()} for name, r in resource_objects.items()}}


def require_shared_storage(instance: dg.DagsterInstance) -> None:
    """Workers on other machines read and write the run's events: SQLite under one DAGSTER_HOME won't do."""
    storage = type(instance.run_storage).__name__
    if "Postgres" not in storage:
        raise SystemExit(
            f"DAGSTER_HOME={os.environ.get('DAGSTER_HOME')} uses {storage}; the Celery executor needs instance "
            "storage every worker reaches (deploy/celery/dagster.yaml: PostgreSQL)"
        )


def init_pools(instance: dg.DagsterInstance) -> list[str]:
    """Create the limit rows of the assets' pools (``default_limit``) once, before runs start.

    Each run creates a pool's row the first time it sees the pool; on PostgreSQL two runs doing that at
    once crash the loser (``UniqueViolation`` on ``concurrency_limits``, then ``InFailedSqlTransaction``:
    dagster-io/dagster#33552, open for 1.13). Done here, in one process, the runs find the row."""
    storage = instance.event_log_storage
    pools = sorted({a.op.pool for a in ALL_ASSETS if isinstance(a, dg.AssetsDefinition) and a.op.pool})
    created = []
    if not storage.supports_global_concurrency_limits:
        return created
    for pool in pools:
        if pool not in storage.get_concurrency_keys() and storage.initialize_concurrency_limit_to_default(pool):
            created.append(pool)
    return created


def execute_command(job: str, config_files: Sequence[str], partition: str | None) -> list[str]:
    """``dagster job execute`` for one run of this code location (its process orchestrates the steps)."""
    command = [sys.executable, "-m", "dagster", "job", "execute", "-m", MODULE, "-a", "defs", "-j", job]
    for path in config_files:
        command += ["-c", str(path)]
    if partition is not None:
        command += ["--tags", json.dumps({"dagster/partition": partition})]
    return command


def run_all(
    commands: Mapping[str, list[str]], parallel: int, log_dir: Path, env: Mapping[str, str] | None = None
) -> dict[str, int]:
    """Start the commands ``parallel`` at a time (stdout/stderr to ``log_dir/<n>.log``); exit codes by name."""
    log_dir.mkdir(parents=True, exist_ok=True)
    pending, running, codes = list(commands.items()), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            name, command = pending.pop(0)
            log = open(log_dir / f"{len(codes) + len(running):03d}.log", "w")
            log.write(f"# {name}\n# {' '.join(command)}\n")
            log.flush()
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=dict(env or os.environ))
            running[name] = (proc, log)
            print(f"started {name} (pid {proc.pid}, log {log.name})", file=sys.stderr, flush=True)
        for name, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                codes[name] = proc.returncode
                del running[name]
                print(
                    f"{'done' if proc.returncode == 0 else 'FAILED'}: {name} (exit {proc.returncode})", file=sys.stderr
                )
        time.sleep(0.5)
    return codes


def run_partitions(
    keys: Sequence[str], config_files: Sequence[str], parallel: int, log_dir: Path, report: bool = False
) -> dict[str, int]:
    """One ``sae_chain`` run per key, ``parallel`` at once; then, if asked, the release report."""
    commands = {key: execute_command(sae_chain_job.name, config_files, key) for key in keys}
    codes = run_all(commands, parallel, log_dir)
    if report and all(code == 0 for code in codes.values()):
        codes |= run_all({"report": execute_command(report_job.name, config_files, None)}, 1, log_dir / "report")
    return codes


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, what in (
        ("materialize", "every SAE of the releases, then the report"),
        ("run-partitions", "these SAE keys"),
    ):
        cmd = sub.add_parser(name, help=f"register and materialise {what} on the Celery workers")
        cmd.add_argument(
            "targets",
            nargs="*",
            help="release ids (default: the tracked planted ones)" if name == "materialize" else "partition keys",
        )
        cmd.add_argument("-c", "--config", action="append", default=[], help="run config YAML (resources)")
        cmd.add_argument("--parallel", type=int, default=4, help="runs in flight at once (default 4)")
        cmd.add_argument(
            "--log-dir", default=None, help="orchestrator logs (default $DAGSTER_HOME/cluster-logs/<time>)"
        )
        if name == "run-partitions":
            cmd.add_argument("--report", action="store_true", help="then the release statistics, plots and report")
    args = parser.parse_args(argv)
    missing = [name for name in (BROKER_ENV, BACKEND_ENV) if not os.environ.get(name)]
    if missing:
        raise SystemExit(
            f"set {' and '.join(missing)} (the Celery broker and result backend, e.g. redis://host:6379/0)"
        )
    with dg.DagsterInstance.get() as instance:
        require_shared_storage(instance)
        init_pools(instance)
        if args.command == "materialize":
            releases = args.targets or default_releases()
            keys = register_partitions(instance, releases, HubResource())
        else:
            if not args.targets:
                parser.error("run-partitions needs at least one partition key")
            keys = list(args.targets)
            instance.add_dynamic_partitions(sae_partitions.name, keys)
        log_dir = Path(args.log_dir or Path(instance.root_directory) / "cluster-logs" / time.strftime("%Y%m%d-%H%M%S"))
    codes = run_partitions(
        keys, args.config, args.parallel, log_dir, report=args.command == "materialize" or args.report
    )
    failed = sorted(name for name, code in codes.items() if code)
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed: {', '.join(failed)}; logs in {log_dir}")
    print(f"done: {len(codes)} run(s) succeeded; logs in {log_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
