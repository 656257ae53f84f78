"""What every asset does the same way: resolve its SAE, store a table, describe it in metadata."""

from pathlib import Path

import dagster as dg
import pandas as pd

from core.registry import SaeRef, parse_key
from core.table_checks import Check
from orchestration.resources import StoreResource

# (asset, check) -> what the check asserts, shown on the asset's Checks tab
CHECK_DESCRIPTIONS: dict[tuple[str, str], str] = {
    ("sae_weights", "one_row_per_feature"): "sae_features holds exactly one row per SAE feature (d_sae rows).",
    ("sae_weights", "norms_finite"): "Every encoder norm, decoder norm and threshold is finite (no NaN/Inf).",
    (
        "lens_tables",
        "one_row_per_feature_side_rank",
    ): "Each lens has one row per direction (features, control, both nulls) × side × rank: the candidates "
    "on top, top_k at the bottom; the Neuronpedia export one row per feature.",
    ("lens_tables", "values_finite"): "Every lens logit, lens statistic and Neuronpedia value is finite.",
    ("lens_tables", "token_ids_in_vocab"): "Every token id of both lenses lies inside the model's vocabulary.",
    (
        "circuit_tables",
        "one_row_per_direction_and_circuit",
    ): "circuit_stats has one row per direction (features, control, null) × attention circuit.",
    ("circuit_tables", "values_finite"): "Every circuit statistic (pre- and post-softmax) is finite.",
    (
        "feature_classes",
        "one_row_per_feature",
    ): "feature_classes and control_classes hold one row per feature, feature_participation one per "
    "direction (features, control) × phase.",
    ("feature_classes", "scores_finite"): "Every feature's top-k z and every attention participation score is finite.",
    (
        "feature_classes",
        "thresholds_recorded",
    ): "class_thresholds holds every calibrated threshold (per null, side and metric), all finite, and every "
    "participation threshold is finite.",
    (
        "activation_agreement",
        "one_row_per_feature",
    ): "activation_features holds one row per SAE feature (fired or not); nothing to check without a corpus.",
    (
        "activation_agreement",
        "values_valid",
    ): "Every agreement statistic and its control is finite, every p-value in [0, 1], every overlap in [0, 1].",
    ("activation_agreement", "token_ids_in_vocab"): "Every fires-on and promoted token id lies inside the vocabulary.",
    (
        "claim_statistics",
        "one_row_per_analysed_sae",
    ): "Per release, C1 by layer has two rows (features, control) per SAE with stored feature classes.",
    (
        "claim_statistics",
        "statistics_finite",
    ): "Per release, C1 fractions with their CIs and the depth profiles are finite.",
    (
        "claim_statistics",
        "verdicts_valid",
    ): "Per release, every claim's verdict is one of consistent, not reproduced, inconclusive, not measured.",
}


def sae_of(context: dg.AssetExecutionContext) -> SaeRef:
    """The SAE named by the run's partition key; records its release, id, layer, width and L0 in the
    materialisation's metadata, because the Dagster UI's partition list cuts long keys off in the middle."""
    ref = parse_key(context.partition_key)
    context.add_asset_metadata(sae_metadata(ref))
    return ref


def sae_metadata(ref: SaeRef) -> dict[str, dg.MetadataValue]:
    """Which SAE a partition is, one field per metadata entry (shown in the Partitions tab's detail view)."""
    return {
        "sae/release": dg.MetadataValue.text(ref.release),
        "sae/sae_id": dg.MetadataValue.text(ref.sae_id),
        "sae/layer": dg.MetadataValue.int(ref.layer),
        "sae/width": dg.MetadataValue.text(ref.width or "not in the SAE id"),
        "sae/l0": dg.MetadataValue.text("not in the SAE id" if ref.l0 is None else str(ref.l0)),
    }


def store_table(store: StoreResource, table: str, key: str, frame: pd.DataFrame) -> dict[str, dg.MetadataValue]:
    """Write one partition's rows (atomically) and refresh the DuckDB views; return metadata saying
    where the rows are and how to query them."""
    return stored_table_metadata(store, table, store.tables().write(table, key, frame), len(frame))


def stored_table_metadata(store: StoreResource, table: str, path: Path, rows: int) -> dict[str, dg.MetadataValue]:
    """Refresh the DuckDB views after ``rows`` rows of ``table`` were stored at ``path``; the metadata saying
    where they are and how to query them."""
    tables = store.tables()
    views_ok = tables.refresh_views()
    return {
        f"{table}/rows": dg.MetadataValue.int(rows),
        f"{table}/parquet": dg.MetadataValue.path(str(path)),
        f"{table}/duckdb": dg.MetadataValue.text(
            f"{tables.db_path} view {table}" + ("" if views_ok else " (view refresh deferred: database busy)")
        ),
    }


def check_specs(asset: str, names: list[str]) -> list[dg.AssetCheckSpec]:
    """Blocking integrity checks an asset reports with each materialisation (shown in the UI), each with its
    description from ``CHECK_DESCRIPTIONS``; a check without one fails the definitions' import."""
    missing = [name for name in names if (asset, name) not in CHECK_DESCRIPTIONS]
    if missing:
        raise KeyError(f"asset checks of {asset} without a description in assets.common.CHECK_DESCRIPTIONS: {missing}")
    return [
        dg.AssetCheckSpec(name, asset=asset, blocking=True, description=CHECK_DESCRIPTIONS[asset, name])
        for name in names
    ]


def check_results(checks: list[Check]) -> list[dg.AssetCheckResult]:
    return [dg.AssetCheckResult(check_name=c.name, passed=c.passed, description=c.detail) for c in checks]
