"""Subprocess entry point for tests/test_reliability.py: materialise planted partitions on a persistent
Dagster instance, the way ``python -m orchestration.cli materialize`` does, but with small test settings.

    python tests/reliability_worker.py HOME CACHE DATA KEY [KEY ...] [--report] [--recover]
                                       [--pause-before-replace TABLE]
    python tests/reliability_worker.py --store-loop DATA ROWS

HOME is a DAGSTER_HOME (instance directory, created if needed; the tests copy the project's
dagster.yaml into it); CACHE a planted hub cache read offline; DATA the data directory. Exits 0 when
every key (and the report, with ``--report``) succeeded, 3 otherwise with the first failure's error
messages on stderr (what the UI shows).

``--recover``: before running, mark runs of this instance whose process is gone (killed) as failed and
free the concurrency-pool slots they held. Without it, a run killed inside a step of pool ``compute``
keeps its slot and every later run waits for it forever (Dagster frees slots of dead runs only through
the daemon's run monitoring or the UI).

``--pause-before-replace TABLE``: fault injection for the crash test — when the store is about to rename
a finished temporary file of TABLE into place, print ``paused <path>`` and wait to be killed.

``--store-loop DATA ROWS``: rewrite one partition of table ``loop`` in DATA forever, alternating two
versions of ROWS rows (``version`` 0 / 1 in every row), printing ``wrote <n>`` after each write.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COMPUTE = dict(device="cpu", null_directions=256, circuit_null_directions=64, circuit_layers="adjacent")
LOOP_KEY = "loop:layer_0/x"


def store_loop(data: str, rows: int) -> int:
    import numpy as np
    import pandas as pd

    from core.store.storage import TableStore

    store = TableStore(data)
    values = np.random.default_rng(0).random(rows)
    # both versions built once, so nearly all of the loop's time is spent inside store.write
    frames = [pd.DataFrame({"row": np.arange(rows), "version": v, "value": values + v}) for v in (0, 1)]
    n = 0
    while True:
        store.write("loop", LOOP_KEY, frames[n % 2])
        n += 1
        print(f"wrote {n}", flush=True)


def pause_before_replace(table: str) -> None:
    """Wrap os.replace (the rename in core.store.atomic) so the rename of TABLE's temp file never happens."""
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).parent.name == table and str(src).endswith(".tmp"):
            print(f"paused {dst}", flush=True)
            time.sleep(3600)
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--store-loop":
        return store_loop(argv[1], int(argv[2]))
    parser = argparse.ArgumentParser()
    parser.add_argument("home")
    parser.add_argument("cache")
    parser.add_argument("data")
    parser.add_argument("keys", nargs="+")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--recover", action="store_true")
    parser.add_argument("--pause-before-replace")
    args = parser.parse_args(argv)
    if args.pause_before_replace:
        pause_before_replace(args.pause_before_replace)

    import dagster as dg

    from orchestration.definitions import REPORT_ASSETS, SAE_ASSETS
    from orchestration.resources import ComputeResource, HubResource, StoreResource

    res = {
        "hub": HubResource(cache_dir=args.cache, offline=True),
        "store": StoreResource(data_dir=args.data),
        "compute": ComputeResource(**COMPUTE),
    }
    from huggingface_hub import get_token

    # Whether huggingface_hub sees a token (HF_TOKEN): the canary test needs to know it was there.
    print("hf token visible" if get_token() else "no hf token", flush=True)
    Path(args.home).mkdir(parents=True, exist_ok=True)
    with dg.DagsterInstance.from_config(args.home) as instance:
        if args.recover:
            from orchestration.recovery import fail_dead_runs

            for run_id in fail_dead_runs(instance):
                print(f"recovered {run_id}", flush=True)
        instance.add_dynamic_partitions("sae", args.keys)
        for key in args.keys:
            print(f"start {key}", flush=True)
            result = dg.materialize(
                SAE_ASSETS, partition_key=key, instance=instance, resources=res, raise_on_error=False
            )
            if not result.success:
                print(f"FAILED {key}\n{failure_text(result)}", file=sys.stderr, flush=True)
                return 3
            print(f"done {key} {result.run_id}", flush=True)
        if args.report:
            result = dg.materialize(REPORT_ASSETS, instance=instance, resources=res, raise_on_error=False)
            if not result.success:
                print(f"FAILED claims_report\n{failure_text(result)}", file=sys.stderr, flush=True)
                return 3
            print(f"done report {result.run_id}", flush=True)
    return 0


def failure_text(result) -> str:
    parts = []
    for event in result.all_events:
        if event.is_step_failure:
            error = event.step_failure_data.error
            while error is not None:
                parts.append(error.message)
                error = error.cause
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
