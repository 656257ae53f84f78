"""Feature-classification assets."""

import dagster as dg

from assets.common import sae_of, store_table
from core.classify import DEFAULT_QUANTILE, classify_output_prediction
from core.frames import with_sae
from core.statistics import wilson_interval
from orchestration.partitions import sae_partitions
from orchestration.resources import StoreResource


@dg.asset(
    partitions_def=sae_partitions,
    group_name="classes",
    deps=["lens_tables"],
    kinds={"parquet"},
)
def feature_classes(context: dg.AssetExecutionContext, store: StoreResource) -> dg.MaterializeResult:
    """Which features directly predict output tokens (``core.classify``: top-k z-score of the output
    lens above the null's P99). Table ``feature_classes``: ``feature, topk_z, output_predicting,
    threshold, null_quantile, null_size``."""
    ref = sae_of(context)
    stats = store.tables().read("output_lens_stats", ref.key)
    result = classify_output_prediction(
        stats[stats["sample"] == "feature"].rename(columns={"feature": "row"}),
        stats[stats["sample"] == "null"].rename(columns={"feature": "row"}),
        DEFAULT_QUANTILE,
    )
    calls = result.calls.rename(columns={"row": "feature"}).assign(
        threshold=result.threshold, null_quantile=result.quantile, null_size=result.null_size
    )
    n, hits = len(calls), int(calls.output_predicting.sum())
    low, high = wilson_interval(hits, n)
    metadata = store_table(store, "feature_classes", ref.key, with_sae(calls, ref))
    metadata |= {
        "output_predicting_fraction": dg.MetadataValue.float(hits / n),
        "fraction_ci95": dg.MetadataValue.text(f"[{low:.3f}, {high:.3f}]"),
        "threshold_topk_z": dg.MetadataValue.float(result.threshold),
    }
    return dg.MaterializeResult(metadata=metadata)
