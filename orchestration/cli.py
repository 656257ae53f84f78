"""Command line: register a release's SAEs as partitions and materialise the chain in this process.

    python -m orchestration.cli materialize [RELEASE ...]     (default: the tracked planted releases)

Runs are recorded in the instance at ``$DAGSTER_HOME`` (the project's), so the UI shows every
materialisation afterwards. SAEs whose partitions are already materialised and up to date are still
recomputed here; the sensor/automation path decides staleness instead.
"""

from __future__ import annotations

import argparse
import sys
from typing import Mapping, Sequence

import dagster as dg

from core.discovery import discover_saes
from core.registry import load_registry
from orchestration.definitions import REPORT_ASSETS, SAE_ASSETS, resources
from orchestration.partitions import sae_partitions
from orchestration.recovery import fail_dead_runs
from orchestration.resources import HubResource


def default_releases() -> list[str]:
    """What ``materialize`` runs when no release is named: the planted releases the sensor tracks."""
    return [r.id for r in load_registry().values() if r.planted and r.track]


def register_partitions(instance: dg.DagsterInstance, release_ids: Sequence[str], hub: HubResource) -> list[str]:
    """Discover the SAEs of each release (hub, or the cache offline) and add their partition keys."""
    keys = []
    for release_id in release_ids:
        listing = discover_saes(release_id, hub.client())
        if not listing.saes:
            raise SystemExit(f"{release_id}: no SAEs found in {listing.release.sae_repo}@{listing.revision}")
        keys += [ref.key for ref in listing.saes]
    instance.add_dynamic_partitions(sae_partitions.name, keys)
    return keys


def materialize_all(
    instance: dg.DagsterInstance, keys: Sequence[str], resources: Mapping[str, dg.ConfigurableResource]
) -> None:
    """Materialise the SAE chain for every key, then the report; stop at the first failure."""
    for i, key in enumerate(keys, 1):
        print(f"[{i}/{len(keys)}] {key}", flush=True)
        result = dg.materialize(SAE_ASSETS, partition_key=key, instance=instance, resources=resources, raise_on_error=False)
        if not result.success:
            raise SystemExit(f"materialisation of {key} failed; see the run in the Dagster UI")
    if not dg.materialize(REPORT_ASSETS, instance=instance, resources=resources, raise_on_error=False).success:
        raise SystemExit("the release statistics, plots or report failed; see the run in the Dagster UI")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m orchestration.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("materialize", help="register SAE partitions and materialise the whole chain")
    run.add_argument("releases", nargs="*", help="release ids (default: the planted releases the sensor tracks)")
    args = parser.parse_args(argv)
    releases = args.releases or default_releases()
    with dg.DagsterInstance.get() as instance:
        for run_id in fail_dead_runs(instance):
            print(f"run {run_id}: its process is gone (killed); marked failed, pool slot freed", file=sys.stderr)
        keys = register_partitions(instance, releases, HubResource())
        materialize_all(instance, keys, resources())
    print("done: every SAE partition and the claims report are materialised", file=sys.stderr)


if __name__ == "__main__":
    main()
