"""Rerun only on change, on a real Dagster instance: automation after a full materialisation requests
nothing; a code-version bump reruns that asset and its descendants; a rewritten SAE file reruns only its
partition; a new layer on the hub becomes a new partition with a run for it alone."""

from __future__ import annotations

import io

import dagster as dg
import numpy as np
import pytest
from dagster._core.definitions.partitions.context import partition_loading_context

from core.registry import get_release, parse_key
from core.testbeds.planted import generate
from core.weights.hub_cache import write_snapshot
from orchestration.cli import materialize_all
from orchestration.definitions import defs
from orchestration.jobs import ALL_ASSETS, REPORT_ASSETS, report_job, sae_chain_job
from orchestration.resources import ComputeResource, HubResource, StoreResource
from orchestration.sensors import sae_release_sensor

pytestmark = pytest.mark.chain

GEMMA = get_release("planted-gemma")
KEYS = [f"planted-gemma:layer_{layer}/width_512/average_l0_32" for layer in (0, 1)]


def requested(result: dg.EvaluateAutomationConditionsResult, instance: dg.DagsterInstance) -> dict[str, set[str]]:
    """Asset name -> the partition keys the evaluation requests (``(unpartitioned)`` for unpartitioned assets)."""
    with partition_loading_context(dynamic_partitions_store=instance):
        return {
            r.key.to_user_string(): set(r.true_subset.expensively_compute_partition_keys())
            if r.true_subset.is_partitioned
            else {"(unpartitioned)"}
            for r in result.results
            if r.true_subset.size
        }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A cache holding planted-gemma layers 0–1 only, both materialised on a fresh instance."""
    cache = tmp_path_factory.mktemp("cache")
    generate("planted-gemma", cache, layers=[0, 1])
    resources = {
        "hub": HubResource(cache_dir=str(cache), offline=True),
        "store": StoreResource(data_dir=str(tmp_path_factory.mktemp("data"))),
        "compute": ComputeResource(device="cpu", null_directions=256, circuit_null_directions=64),
    }
    instance = dg.DagsterInstance.ephemeral()
    sensor_result = sae_release_sensor(dg.build_sensor_context(instance=instance, resources=resources))
    assert sorted(r.partition_key for r in sensor_result.run_requests if "planted-gemma" in r.partition_key) == KEYS
    instance.add_dynamic_partitions("sae", KEYS)
    materialize_all(instance, KEYS, resources)
    return instance, cache, resources


def sensor_runs(world) -> dict[str, str] | str:
    instance, _, resources = world
    result = sae_release_sensor(dg.build_sensor_context(instance=instance, resources=resources))
    if isinstance(result, dg.SkipReason):
        return result.skip_message
    return {
        r.partition_key: r.tags["weightlens/reason"]
        for r in result.run_requests
        if r.partition_key.startswith("planted-gemma")
    }


def observed_vs_materialised(world) -> dict[str, bool]:
    """Observe ``sae_files`` (the observation job users run from the UI); per key, whether its observed
    data version equals the data version ``sae_weights`` recorded when it last read the files."""
    instance, _, resources = world
    assert defs.resolve_job_def("observe_sae_files").execute_in_process(instance=instance, resources=resources).success
    same = {}
    for key in KEYS:

        def latest(fetch, asset, key=key):
            (record,) = fetch(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[key]), limit=1
            ).records
            return record.event_log_entry.dagster_event.event_specific_data

        observed = latest(instance.fetch_observations, "sae_files").asset_observation.data_version
        stored = latest(instance.fetch_materializations, "sae_weights").materialization.tags["dagster/data_version"]
        same[key] = observed == stored
    return same


def test_nothing_reruns_when_nothing_changed(world):
    instance = world[0]
    first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert requested(first, instance) == {}
    assert (
        requested(dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor), instance) == {}
    )
    runs = sensor_runs(world)
    assert isinstance(runs, str) or runs == {}  # planted-llama is not in this cache: only a problem, no run


def bumped(*names: str) -> dg.Definitions:
    """The definitions with the code version of the assets ``names`` changed."""
    assets = [
        a.map_asset_specs(lambda s: s.replace_attributes(code_version="bumped"))
        if a.key.to_user_string() in names
        else a
        for a in ALL_ASSETS
    ]
    return dg.Definitions(assets=assets, resources=defs.resources)


def test_code_version_bump_reruns_cheap_assets_only(world):
    instance = world[0]
    cursor = dg.evaluate_automation_conditions(defs=defs, instance=instance).cursor
    # a pool-"compute" asset's code change is never re-queued silently (GPU-hours on a real release)
    assert (
        requested(
            dg.evaluate_automation_conditions(
                defs=bumped("lens_tables", "circuit_tables"), instance=instance, cursor=cursor
            ),
            instance,
        )
        == {}
    )
    result = dg.evaluate_automation_conditions(defs=bumped("feature_classes"), instance=instance, cursor=cursor)
    assert requested(result, instance) == {"feature_classes": set(KEYS)}  # the report follows once they are rebuilt


def test_a_rematerialised_partition_makes_the_automation_sensor_rebuild_the_report(world):
    instance, _, resources = world
    assert defs.resolve_sensor_def("automation_sensor").default_status == dg.DefaultSensorStatus.RUNNING
    cursor = dg.evaluate_automation_conditions(defs=defs, instance=instance).cursor
    missing = "planted-gemma:layer_5/width_512/average_l0_32"  # registered, never materialised (failed)
    instance.add_dynamic_partitions("sae", [missing])
    job = sae_chain_job.resolve(asset_graph=defs.resolve_asset_graph())
    assert job.execute_in_process(instance=instance, partition_key=KEYS[0], resources=resources).success
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
    # exactly the release-level assets, although one SAE partition is missing
    assert requested(result, instance) == {a.key.to_user_string(): {"(unpartitioned)"} for a in REPORT_ASSETS}
    # ... and they update from the stored partitions, naming the missing one in the table, metadata and report
    job = report_job.resolve(asset_graph=defs.resolve_asset_graph())
    run = job.execute_in_process(instance=instance, resources=resources)
    instance.delete_dynamic_partition("sae", missing)
    assert run.success
    coverage = resources["store"].tables().read("sae_coverage", "planted-gemma")
    sae_id = missing.partition(":")[2]
    assert dict(zip(coverage["sae_id"], coverage["status"])) == {
        sae_id: "missing",
        **{key.partition(":")[2]: "analysed" for key in KEYS},
    }
    (statistics,) = [m for m in run.asset_materializations_for_node("claim_statistics")]
    assert statistics.metadata["planted-gemma/missing_saes"].value == [sae_id]
    report = (resources["store"].artifacts("reports") / "planted-gemma" / "report.md").read_text()
    assert f"Registered SAEs not analysed (never materialised or failed): {sae_id}" in report


def test_rewritten_sae_reruns_only_its_partition(world):
    instance, cache, resources = world
    ref = parse_key(KEYS[1])
    snapshot = cache / f"models--{GEMMA.sae_repo.replace('/', '--')}" / "snapshots"
    path = next(snapshot.glob(f"*/{ref.folder}/params.npz"))
    with np.load(path) as npz:
        arrays = {name: npz[name] for name in npz.files}
    arrays["threshold"] = arrays["threshold"] * 1.5  # a retrained SAE: same shapes, new values
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)

    assert observed_vs_materialised(world) == {KEYS[0]: True, KEYS[1]: True}
    write_snapshot(cache, GEMMA.sae_repo, {f"{ref.folder}/params.npz": buffer.getvalue()})
    # the observable source sees exactly that SAE's bytes change; the sensor agrees
    assert observed_vs_materialised(world) == {KEYS[0]: True, KEYS[1]: False}
    assert sensor_runs(world) == {KEYS[1]: "changed: sae_fingerprint"}
    before = {
        k: len(
            instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey("lens_tables"), asset_partitions=[k]), limit=10
            ).records
        )
        for k in KEYS
    }
    result = sae_chain_job.resolve(asset_graph=defs.resolve_asset_graph()).execute_in_process(
        instance=instance, partition_key=KEYS[1], resources=resources
    )
    assert result.success
    after = {
        k: len(
            instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey("lens_tables"), asset_partitions=[k]), limit=10
            ).records
        )
        for k in KEYS
    }
    assert after == {KEYS[0]: before[KEYS[0]], KEYS[1]: before[KEYS[1]] + 1}
    runs = sensor_runs(world)
    assert isinstance(runs, str) or runs == {}  # up to date again
    assert observed_vs_materialised(world) == {KEYS[0]: True, KEYS[1]: True}


def test_new_layer_on_the_hub_adds_one_partition_and_one_run(world):
    instance, cache, resources = world
    generate("planted-gemma", cache, layers=[2])  # the release grows a layer: a new revision on top
    new_key = "planted-gemma:layer_2/width_512/average_l0_32"
    result = sae_release_sensor(dg.build_sensor_context(instance=instance, resources=resources))
    assert [r.partition_key for r in result.run_requests if r.partition_key.startswith("planted-gemma")] == [new_key]
    (add,) = result.dynamic_partitions_requests
    assert list(add.partition_keys) == [new_key]


def test_unreachable_releases_skip_the_tick_with_a_reason(tmp_path):
    context = dg.build_sensor_context(
        instance=dg.DagsterInstance.ephemeral(), resources={"hub": HubResource(cache_dir=str(tmp_path), offline=True)}
    )
    result = sae_release_sensor(context)
    assert isinstance(result, dg.SkipReason)
    assert "planted-gemma:" in result.skip_message and "is not in" in result.skip_message
