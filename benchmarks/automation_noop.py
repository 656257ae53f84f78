"""Cost of one no-op automation evaluation of the whole asset graph, by number of SAE partitions.

Materialisation events (with the assets' current code versions, as a run would record them) are
reported for every partition of every asset on a temporary instance, so the graph is up to date; the
script then times ``evaluate_automation_conditions`` — what the automation sensor does every tick —
and checks that it requests nothing.

    python benchmarks/automation_noop.py [--partitions 100 500 1000]
"""

import argparse
import tempfile
import time

import dagster as dg

from orchestration.definitions import defs
from orchestration.jobs import ALL_ASSETS


def up_to_date_instance(instance: dg.DagsterInstance, n: int) -> None:
    keys = [f"bench:layer_{i}" for i in range(n)]
    instance.add_dynamic_partitions("sae", keys)
    graph = defs.resolve_asset_graph()
    for asset in ALL_ASSETS:
        node = graph.get(asset.key)
        tags = {"dagster/code_version": node.code_version}
        for key in keys if node.partitions_def else [None]:
            instance.report_runless_asset_event(dg.AssetMaterialization(asset.key, partition=key, tags=tags))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--partitions", type=int, nargs="+", default=[100, 500, 1000])
    args = parser.parse_args()
    print(f"{'partitions':>10} {'first eval s':>13} {'no-op eval s':>13} {'requested':>10}")
    for n in args.partitions:
        with tempfile.TemporaryDirectory() as home, dg.DagsterInstance.from_config(home) as instance:
            up_to_date_instance(instance, n)
            start = time.perf_counter()
            first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
            first_s = time.perf_counter() - start
            start = time.perf_counter()
            again = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
            noop_s = time.perf_counter() - start
            print(f"{n:>10} {first_s:>13.2f} {noop_s:>13.2f} {again.total_requested:>10}")


if __name__ == "__main__":
    main()
