"""Feature-classification assets: semantic / output-predicting classes and attention participation."""

import dagster as dg

from assets.common import check_specs, description, materialize, sae_of
from core import pipeline
from orchestration.partitions import sae_partitions
from orchestration.resources import ComputeResource, HubResource, StoreResource

CLASS_CHECKS = ["one_row_per_feature", "scores_finite", "thresholds_recorded"]


@dg.asset(
    partitions_def=sae_partitions,
    group_name="classes",
    deps=["lens_tables", "circuit_tables"],
    kinds={"parquet"},
    check_specs=check_specs("feature_classes", CLASS_CHECKS),
    description=description(pipeline.feature_classes),
)
def feature_classes(
    context: dg.AssetExecutionContext, hub: HubResource, store: StoreResource, compute: ComputeResource
) -> dg.MaterializeResult:
    ref = sae_of(context)
    out = pipeline.feature_classes(ref, hub.client(), store.tables(), compute.top_k, store.artifacts("browser"))
    return materialize(context, store, out)
