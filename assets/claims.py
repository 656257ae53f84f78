"""Release-level statistics behind the paper's claims (``core.claims``), from every SAE's tables."""

from collections.abc import Iterator

import dagster as dg

from assets.common import check_results, check_specs, store_table
from core.claims import CLASS_TABLES, ReleaseResults, results_from_tables, verdict_table
from core.profiles import PROFILE_STATS
from core.registry import get_release
from core.verdicts import VERDICTS
from core.table_checks import Check, combined, finite, rows_match
from core.truth import load_truth
from orchestration.resources import HubResource, StoreResource

STATISTICS_CHECKS = ["one_row_per_analysed_sae", "statistics_finite", "verdicts_valid"]


@dg.asset(
    group_name="claims",
    deps=[dg.AssetDep("feature_classes", partition_mapping=dg.AllPartitionMapping())],
    kinds={"parquet"},
    check_specs=check_specs("claim_statistics", STATISTICS_CHECKS),
)
def claim_statistics(
    context: dg.AssetExecutionContext, hub: HubResource, store: StoreResource
) -> Iterator[dg.Output | dg.AssetCheckResult]:
    """Per release with stored feature classes: every measured quantity of claims C1–C4 for the features
    and their control (``core.claims.release_results``), handed to the plot and report assets, and stored
    as tables ``claim_verdicts`` (``core.verdicts``: ``release, claim, verdict, statistic, value, ci_low,
    ci_high, control_value, p_value, n, rule``), ``output_fraction_by_layer`` (``sample, layer, sae_id, n,
    hits, fraction, ci_low, ci_high``) and ``depth_profiles`` (``sample, phase, layer, depth, n,
    participating, mean/median/p75`` with 95 % bands). Planted releases carry their ground truth."""
    tables = store.tables()
    frames = {name: tables.read(name) for name in CLASS_TABLES}
    if frames["feature_classes"].empty:
        raise dg.Failure("No feature_classes rows are stored yet: materialise at least one SAE partition first.")
    results: dict[str, ReleaseResults] = {}
    metadata: dict[str, dg.MetadataValue] = {}
    parts: dict[str, list[Check]] = {name: [] for name in STATISTICS_CHECKS}
    for release_id in sorted(frames["feature_classes"]["release"].unique()):
        release = get_release(str(release_id))
        truth = load_truth(release.id, hub.client()).data if release.planted else None
        result = results_from_tables(release, frames, truth)
        for table, frame in (("claim_verdicts", result.verdicts), ("output_fraction_by_layer", result.by_layer),
                             ("depth_profiles", result.profile)):
            if len(frame):
                metadata |= store_table(store, table, release.id, frame)
        metadata[f"{release.id}/verdicts"] = dg.MetadataValue.md(verdict_table(result.verdicts))
        if result.missing_layers:
            context.log.warning(f"{release.id}: no analysed SAE for layers {result.missing_layers}")
        metadata[f"{release.id}/missing_layers"] = dg.MetadataValue.text(str(result.missing_layers))
        results[release.id] = result
        analysed = frames["feature_classes"].query("release == @release.id")["sae_id"].nunique()
        parts["one_row_per_analysed_sae"].append(rows_match(f"{release.id} by layer (features, control)", result.by_layer,
                                                            2 * analysed))
        parts["verdicts_valid"].append(Check(f"{release.id} verdicts", bool(result.verdicts["verdict"].isin(VERDICTS).all()),
                                             ", ".join(f"{c}: {v}" for c, v in zip(result.verdicts["claim"], result.verdicts["verdict"]))))
        parts["statistics_finite"].append(finite(f"{release.id} by layer", result.by_layer, ["fraction", "ci_low", "ci_high"]))
        if len(result.profile):
            parts["statistics_finite"].append(finite(f"{release.id} profiles", result.profile, list(PROFILE_STATS)))
    yield dg.Output(results, metadata=metadata)
    yield from check_results([combined(name, found) for name, found in parts.items()])
