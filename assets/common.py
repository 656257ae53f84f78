"""What every asset does the same way: resolve its SAE, store a table, describe it in metadata."""

import inspect
from collections.abc import Callable
from pathlib import Path

import dagster as dg

from core.registry import SaeRef, parse_key
from core.stage_output import Fact, Markdown, StageOutput
from core.store.storage import TableStore
from core.store.table_checks import Check, combined
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


def description(stage: Callable) -> str:
    """An asset's description: the docstring of the core stage it runs (``core.pipeline``), its one home."""
    return inspect.cleandoc(stage.__doc__ or "")


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


def table_metadata(
    tables: TableStore, table: str, path: Path, rows: int, views_ok: bool
) -> dict[str, dg.MetadataValue]:
    """The metadata saying where ``rows`` rows of ``table`` are stored (``path``) and how to query them (``views_ok``:
    whether the DuckDB views were refreshed after they were stored)."""
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


def metadata_value(fact: Fact) -> dg.MetadataValue:
    """A stage's fact as Dagster metadata of its kind (``core.stage_output.Fact``)."""
    if isinstance(fact, Markdown):
        return dg.MetadataValue.md(fact)
    if isinstance(fact, bool):
        return dg.MetadataValue.bool(fact)
    if isinstance(fact, int):
        return dg.MetadataValue.int(fact)
    if isinstance(fact, float):
        return dg.MetadataValue.float(fact)
    if isinstance(fact, Path):
        return dg.MetadataValue.path(str(fact))
    if isinstance(fact, str):
        return dg.MetadataValue.text(fact)
    return dg.MetadataValue.json(fact)


def materialize(
    context: dg.AssetExecutionContext, store: StoreResource | None, outputs: StageOutput | list[StageOutput]
) -> dg.MaterializeResult:
    """Store every table of the stage's ``outputs`` (atomically, each under its output's key; ``store`` None:
    outputs without tables), log their warnings, and report their facts as metadata and their check groups as
    asset checks (a group's parts from all outputs combined)."""
    outputs = [outputs] if isinstance(outputs, StageOutput) else outputs
    written = [(out, name, frame) for out in outputs for name, frame in out.tables.items()]
    streamed = [(out, name, rows) for out in outputs for name, rows in out.streamed.items()]
    metadata: dict[str, dg.MetadataValue] = {}
    if written or streamed:
        if store is None:
            raise ValueError("a stage with tables needs the store")
        tables = store.tables()
        places = [(out, name, tables.write(name, out.key, frame), len(frame)) for out, name, frame in written]
        places += [(out, name, tables.file(name, out.key), rows) for out, name, rows in streamed]
        views_ok = tables.refresh_views()  # once, after every table is stored
        for out, name, path, rows in places:
            entries = table_metadata(tables, name, path, rows, views_ok)
            metadata |= {out.label_prefix + label: value for label, value in entries.items()}
    parts: dict[str, list[Check]] = {}
    for out in outputs:
        metadata |= {out.label_prefix + label: metadata_value(fact) for label, fact in out.facts.items()}
        for name, found in out.checks.items():
            parts.setdefault(name, []).extend(found)
        for warning in out.warnings:
            context.log.warning(warning)
    checks = [
        found[0] if len(found) == 1 and found[0].name == name else combined(name, found)
        for name, found in parts.items()
    ]
    versions = {out.data_version for out in outputs} - {None}
    return dg.MaterializeResult(
        metadata=metadata,
        check_results=check_results(checks),
        data_version=dg.DataVersion(versions.pop()) if len(versions) == 1 else None,
    )
