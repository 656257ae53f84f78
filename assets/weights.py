"""Weight assets: fetch and verify an SAE and its model, record provenance and per-feature norms."""

import dagster as dg

from assets.common import check_specs, description, materialize, sae_of
from core import pipeline
from orchestration.partitions import sae_partitions
from orchestration.resources import HubResource, StoreResource


@dg.asset(
    partitions_def=sae_partitions,
    group_name="weights",
    deps=["sae_files"],
    kinds={"huggingface", "parquet"},
    check_specs=check_specs("sae_weights", ["one_row_per_feature", "norms_finite"]),
    description=description(pipeline.sae_weights),
)
def sae_weights(context: dg.AssetExecutionContext, hub: HubResource, store: StoreResource) -> dg.MaterializeResult:
    return materialize(context, store, pipeline.sae_weights(sae_of(context), hub.client()))


@dg.asset(
    partitions_def=sae_partitions,
    group_name="weights",
    kinds={"huggingface"},
    description=description(pipeline.model_weights),
)
def model_weights(context: dg.AssetExecutionContext, hub: HubResource) -> dg.MaterializeResult:
    return materialize(context, None, pipeline.model_weights(sae_of(context), hub.client()))  # no tables
