"""Release-level statistics behind the paper's claims (``core.claims``), from every SAE's tables."""

import dagster as dg

from assets.common import check_results, check_specs, store_table
from core.claims import (
    AGREEMENT_TABLES,
    CLASS_TABLES,
    RESULT_TABLES,
    ReleaseResults,
    missing_saes,
    results_from_tables,
    verdict_table,
)
from core.profiles import PROFILE_STATS
from core.registry import get_release
from core.table_checks import Check, combined, finite, rows_match
from core.truth import load_truth
from core.verdicts import VERDICTS
from orchestration.partitions import sae_partitions
from orchestration.resources import HubResource, StoreResource

STATISTICS_CHECKS = ["one_row_per_analysed_sae", "statistics_finite", "verdicts_valid"]


def stored_results(store: StoreResource, hub: HubResource) -> dict[str, ReleaseResults]:
    """Per release, what ``claim_statistics`` stored (``core.claims.RESULT_TABLES``) with the class tables it read
    and, for planted releases, the ground truth: the one data path of the plots and the report (no pickle)."""
    tables = store.tables()
    frames = {name: tables.read(name) for name in (*CLASS_TABLES, *AGREEMENT_TABLES, *RESULT_TABLES)}
    if frames["claim_verdicts"].empty:
        raise dg.Failure("No claim_verdicts are stored yet: materialise claim_statistics first.")
    out = {}
    for release_id in sorted(frames["claim_verdicts"]["release"].unique()):
        release = get_release(str(release_id))
        truth = load_truth(release.id, hub.client()).data if release.planted else None
        out[release.id] = results_from_tables(release, frames, truth, computed=True)
    return out


@dg.asset(
    group_name="claims",
    deps=[
        dg.AssetDep(name, partition_mapping=dg.AllPartitionMapping())
        for name in ("feature_classes", "sae_weights", "activation_agreement")
    ],
    kinds={"parquet"},
    check_specs=check_specs("claim_statistics", STATISTICS_CHECKS),
)
def claim_statistics(context: dg.AssetExecutionContext, hub: HubResource, store: StoreResource) -> dg.MaterializeResult:
    """Per release with stored feature classes: every measured quantity of claims C1–C4 for the features
    and their control (``core.claims.release_results``), stored as tables (the plot and report assets read
    them back, ``stored_results``): ``claim_verdicts`` (``core.verdicts``: ``release, claim, verdict, statistic,
    value, ci_low, ci_high, control_value, p_value, n, rule``), ``output_fraction_by_layer`` (``sample, layer, sae_id,
    n, hits, fraction, ci_low, ci_high``) and ``depth_profiles`` (``sample, phase, layer, depth, n,
    participating, mean/median/p75`` with 95 % bands) and, where ``activation_agreement`` ran (releases with a
    corpus), ``release_agreement`` (``core.agreement.release_agreement``). Planted releases carry their ground
    truth."""
    tables = store.tables()
    frames = {name: tables.read(name) for name in (*CLASS_TABLES, *AGREEMENT_TABLES)}
    if frames["feature_classes"].empty:
        raise dg.Failure("No feature_classes rows are stored yet: materialise at least one SAE partition first.")
    metadata: dict[str, dg.MetadataValue] = {}
    parts: dict[str, list[Check]] = {name: [] for name in STATISTICS_CHECKS}
    registered = context.instance.get_dynamic_partitions(sae_partitions.name)  # "{release}:{sae_id}"
    for release_id in sorted(frames["feature_classes"]["release"].unique()):
        release = get_release(str(release_id))
        truth = load_truth(release.id, hub.client()).data if release.planted else None
        result = results_from_tables(
            release,
            frames,
            truth,
            registered=[key.partition(":")[2] for key in registered if key.startswith(f"{release.id}:")],
        )
        for table, frame in (
            ("sae_coverage", result.coverage),
            ("claim_verdicts", result.verdicts),
            ("output_fraction_by_layer", result.by_layer),
            ("depth_profiles", result.profile),
            ("release_agreement", result.agreement),
        ):
            if len(frame):
                metadata |= {
                    f"{release.id}/{label}": value  # one key per release: none overwrites another's
                    for label, value in store_table(store, table, release.id, frame).items()
                }
        metadata[f"{release.id}/verdicts"] = dg.MetadataValue.md(verdict_table(result.verdicts))
        if result.missing_layers:
            context.log.warning(f"{release.id}: no analysed SAE for layers {result.missing_layers}")
        metadata[f"{release.id}/missing_layers"] = dg.MetadataValue.text(str(result.missing_layers))
        if not_analysed := missing_saes(result.coverage):
            context.log.warning(f"{release.id}: registered SAEs not analysed (statistics without them): {not_analysed}")
        metadata[f"{release.id}/missing_saes"] = dg.MetadataValue.json(not_analysed)
        analysed = frames["feature_classes"].query("release == @release.id")["sae_id"].nunique()
        parts["one_row_per_analysed_sae"].append(
            rows_match(f"{release.id} by layer (features, control)", result.by_layer, 2 * analysed)
        )
        parts["verdicts_valid"].append(
            Check(
                f"{release.id} verdicts",
                bool(result.verdicts["verdict"].isin(VERDICTS).all()),
                ", ".join(f"{c}: {v}" for c, v in zip(result.verdicts["claim"], result.verdicts["verdict"])),
            )
        )
        parts["statistics_finite"].append(
            finite(f"{release.id} by layer", result.by_layer, ["fraction", "ci_low", "ci_high"])
        )
        if len(result.profile):
            parts["statistics_finite"].append(finite(f"{release.id} profiles", result.profile, list(PROFILE_STATS)))
    return dg.MaterializeResult(
        metadata=metadata, check_results=check_results([combined(name, found) for name, found in parts.items()])
    )
