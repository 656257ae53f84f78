"""Release-level statistics behind the paper's claims (``core.analysis.claims``), from every SAE's tables."""

import dagster as dg

from assets.common import check_specs, description, materialize
from core import pipeline
from core.analysis.claims import AGREEMENT_TABLES, CLASS_TABLES, RESULT_TABLES, ReleaseResults, results_from_tables
from core.registry import get_release
from core.testbeds.truth import load_truth
from core.weights.discovery import model_geometry
from orchestration.partitions import sae_partitions
from orchestration.resources import HubResource, StoreResource

STATISTICS_CHECKS = ["one_row_per_analysed_sae", "statistics_finite", "verdicts_valid"]


def stored_results(store: StoreResource, hub: HubResource) -> dict[str, ReleaseResults]:
    """Per release, what ``claim_statistics`` stored (``core.analysis.claims.RESULT_TABLES``) with the class tables it
    read and, for planted releases, the ground truth: the one data path of the plots and the report (no pickle)."""
    tables = store.tables()
    frames = {name: tables.read(name) for name in (*CLASS_TABLES, *AGREEMENT_TABLES, *RESULT_TABLES)}
    if frames["claim_verdicts"].empty:
        raise dg.Failure("No claim_verdicts are stored yet: materialise claim_statistics first.")
    out = {}
    for release_id in sorted(frames["claim_verdicts"]["release"].unique()):
        release = get_release(str(release_id))
        truth = load_truth(release.id, hub.client()).data if release.planted else None
        architecture = model_geometry(release.id, hub.client()).architecture
        out[release.id] = results_from_tables(release, architecture, frames, truth, computed=True)
    return out


@dg.asset(
    group_name="claims",
    deps=[
        dg.AssetDep(name, partition_mapping=dg.AllPartitionMapping())
        for name in ("feature_classes", "sae_weights", "activation_agreement")
    ],
    kinds={"parquet"},
    check_specs=check_specs("claim_statistics", STATISTICS_CHECKS),
    description=description(pipeline.claim_statistics),
)
def claim_statistics(context: dg.AssetExecutionContext, hub: HubResource, store: StoreResource) -> dg.MaterializeResult:
    tables = store.tables()
    frames = {name: tables.read(name) for name in pipeline.STATISTICS_INPUTS}
    registered = context.instance.get_dynamic_partitions(sae_partitions.name)  # "{release}:{sae_id}"
    return materialize(context, store, pipeline.claim_statistics(frames, registered, hub.client()))
