"""Interaction assets: weight-only lenses and attention circuits between SAE features and the vocabulary."""

import dagster as dg

from assets.common import check_specs, description, materialize, sae_of
from core import pipeline
from orchestration.partitions import sae_partitions
from orchestration.resources import ComputeResource, HubResource, StoreResource

INTERACTION_ASSET = dict(
    partitions_def=sae_partitions,
    group_name="interactions",
    deps=["sae_weights", "model_weights"],
    pool="compute",
    kinds={"pytorch", "parquet"},
)
LENS_CHECKS = ["one_row_per_feature_side_rank", "values_finite", "token_ids_in_vocab"]
CIRCUIT_CHECKS = ["one_row_per_direction_and_circuit", "values_finite"]


@dg.asset(
    **INTERACTION_ASSET,
    check_specs=check_specs("lens_tables", LENS_CHECKS),
    description=description(pipeline.lens_tables),
)
def lens_tables(
    context: dg.AssetExecutionContext, hub: HubResource, store: StoreResource, compute: ComputeResource
) -> dg.MaterializeResult:
    ref = sae_of(context)
    out = pipeline.lens_tables(ref, hub.client(), compute.null_directions, compute.engine(), store.artifacts("exports"))
    return materialize(context, store, out)


@dg.asset(
    **INTERACTION_ASSET,
    check_specs=check_specs("circuit_tables", CIRCUIT_CHECKS),
    description=description(pipeline.circuit_tables),
)
def circuit_tables(
    context: dg.AssetExecutionContext, hub: HubResource, store: StoreResource, compute: ComputeResource
) -> dg.MaterializeResult:
    ref = sae_of(context)

    def progress(i: int, n: int) -> None:
        if i % 24 == 0:
            context.log.info(f"circuits {ref.key}: {i}/{n}")

    settings = (compute.circuit_null_directions, compute.engine(), compute.circuit_layers, compute.circuit_set)
    out = pipeline.circuit_tables(ref, hub.client(), store.tables(), *settings, progress)
    return materialize(context, store, out)
