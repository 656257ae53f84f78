"""Tracking SAE releases: a sensor (hourly) and a schedule (daily) that add partitions for new SAEs and
request runs only for SAEs whose files, or whose model's revision, changed (``core.release_watch``).

Both compare the hub's (or, offline, the cache's) state with what the last materialisation recorded:
the ``sae_weights`` data version (content id of the SAE's files) and ``model_weights``' ``revision``
metadata. Hub or cache failures skip that release with the reason in the tick, never a crash loop.
"""

import dagster as dg

from core.release_watch import Plan, SaeState, describe, plan_refresh, tracked_releases
from orchestration.jobs import sae_chain_job
from orchestration.partitions import sae_partitions
from orchestration.resources import HubResource


def recorded_state(instance: dg.DagsterInstance, key: str) -> SaeState | None:
    """What the latest materialisations of one SAE partition recorded (None if never materialised)."""
    states = []
    for asset, read in (
        ("sae_weights", lambda m: m.tags.get("dagster/data_version")),
        ("model_weights", lambda m: m.metadata["revision"].value if "revision" in m.metadata else None),
    ):
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[key]), limit=1
        ).records
        if not records:
            return None
        states.append(read(records[0].asset_materialization))
    return SaeState(sae_fingerprint=states[0], model_revision=states[1])


def refresh_plan(instance: dg.DagsterInstance, hub: HubResource) -> Plan:
    known = set(instance.get_dynamic_partitions(sae_partitions.name))
    return plan_refresh(tracked_releases(), hub.client(), known, lambda key: recorded_state(instance, key))


def run_requests(plan: Plan) -> list[dg.RunRequest]:
    """One run of the SAE chain per new or changed SAE; the run key makes a repeated tick idempotent."""
    reasons = {**{k: "new SAE" for k in plan.new}, **{k: f"changed: {why}" for k, why in plan.changed.items()}}
    return [
        dg.RunRequest(partition_key=key, run_key=f"{key}|{reason}", tags={"weightlens/reason": reason})
        for key, reason in reasons.items()
    ]


@dg.sensor(
    job=sae_chain_job,
    minimum_interval_seconds=3600,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Hourly: new SAEs in tracked releases become partitions and are computed; changed ones rerun.",
)
def sae_release_sensor(context: dg.SensorEvaluationContext, hub: HubResource) -> dg.SensorResult | dg.SkipReason:
    plan = refresh_plan(context.instance, hub)
    summary = describe(plan)
    if not plan.to_run:
        return dg.SkipReason(summary)
    context.log.info(summary)
    known = set(context.instance.get_dynamic_partitions(sae_partitions.name))
    new_keys = [k for k in plan.new if k not in known]
    return dg.SensorResult(
        run_requests=run_requests(plan),
        dynamic_partitions_requests=[sae_partitions.build_add_request(new_keys)] if new_keys else [],
    )


@dg.schedule(
    job=sae_chain_job,
    cron_schedule="0 6 * * *",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Daily at 06:00, the same check as sae_release_sensor, for users who prefer fixed times.",
)
def sae_release_schedule(context: dg.ScheduleEvaluationContext, hub: HubResource):
    plan = refresh_plan(context.instance, hub)
    if not plan.to_run:
        return dg.SkipReason(describe(plan))
    known = set(context.instance.get_dynamic_partitions(sae_partitions.name))
    new_keys = [k for k in plan.new if k not in known]
    if new_keys:  # schedules cannot return partition requests: add them before requesting their runs
        context.instance.add_dynamic_partitions(sae_partitions.name, new_keys)
    return run_requests(plan)
