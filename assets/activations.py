"""Activation agreement: the weight-based reading of each feature against what it does on the release's corpus."""

import dagster as dg

from assets.common import check_specs, description, materialize, sae_of
from core import pipeline
from orchestration.partitions import sae_partitions
from orchestration.resources import ComputeResource, HubResource, StoreResource


@dg.asset(
    partitions_def=sae_partitions,
    group_name="activations",
    deps=["lens_tables", "feature_classes"],
    kinds={"pytorch", "parquet"},
    check_specs=check_specs("activation_agreement", list(pipeline.AGREEMENT_CHECKS)),
    description=description(pipeline.activation_agreement),
)
def activation_agreement(
    context: dg.AssetExecutionContext, hub: HubResource, store: StoreResource, compute: ComputeResource
) -> dg.MaterializeResult:
    ref = sae_of(context)
    out = pipeline.activation_agreement(ref, hub.client(), store.tables(), compute.top_k, compute.resolved_device())
    return materialize(context, store, out)
