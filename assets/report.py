"""Report asset: the paper's claims measured over every stored SAE, per release, with plots."""

import base64
import os
from pathlib import Path

import dagster as dg

from assets.common import store_table
from core.claims import ReleaseResults, release_results, render_report
from core.plots import (
    depth_profile_plot,
    null_vs_observed_plot,
    output_fraction_plot,
    participation_heatmap,
    semantic_violins,
)
from core.registry import get_release
from core.truth import load_truth
from orchestration.resources import HubResource, StoreResource

PLOT_NAME = "c1_output_fraction.png"
PLOT_FILES = {
    "c1": PLOT_NAME,
    "c2": "c2_depth_profiles.png",
    "heatmap": "c2_layer_head_participation.png",
    "c3": "c3_semantic_vs_non_semantic.png",
    "null": "calibration_null_vs_observed.png",
}
VIOLIN_VALUES = {
    "score_encoder_embedding": "encoder–embedding participation\n(QK score above null median)",
    "score_decoder_unembedding": "decoder–unembedding participation\n(OV write norm above null median)",
    "encoder_norm": "raw encoder norm ‖W_enc[:, i]‖",
    "decoder_norm": "raw decoder norm ‖W_dec[i]‖",
}
ARCHITECTURE = {"gemma_scope_npz": "gemma2", "llama_scope_safetensors": "llama"}


def write_plots(results: ReleaseResults, folder: Path) -> dict[str, Path]:
    """Every plot of a release's report (``core.plots``), file names in ``PLOT_FILES``."""
    truth_fraction = results.truth.output.truth_fraction if results.truth else None
    paths = {"c1": output_fraction_plot(results.by_layer, results.release, folder / PLOT_FILES["c1"], truth_fraction)}
    if not results.profile.empty:
        paths["c2"] = depth_profile_plot(results.profile, results.shapes, results.release, folder / PLOT_FILES["c2"], results.truth_strength)
        paths["heatmap"] = participation_heatmap(results.head_participation, results.release, folder / PLOT_FILES["heatmap"])
    paths["c3"] = semantic_violins(results.per_feature, VIOLIN_VALUES, results.release, folder / PLOT_FILES["c3"])
    if len(results.null_rows):
        paths["null"] = null_vs_observed_plot(results.per_feature, results.null_rows, results.thresholds, results.release, folder / PLOT_FILES["null"])
    return paths


@dg.asset(
    group_name="report",
    deps=[dg.AssetDep("feature_classes", partition_mapping=dg.AllPartitionMapping())],
    kinds={"markdown", "seaborn"},
)
def claims_report(context: dg.AssetExecutionContext, hub: HubResource, store: StoreResource) -> dg.MaterializeResult:
    """One markdown report per release under ``<data>/reports/<release>/report.md`` with its plots
    (``PLOT_FILES``), and tables ``output_fraction_by_layer`` (``layer, sae_id, n, hits, fraction, ci_low,
    ci_high``), ``depth_profiles`` (``phase, layer, depth, n, participating, mean/median/p75`` and bands),
    ``depth_shapes`` (``phase, statistic, curvature, ci_low, ci_high, vertex, shape``),
    ``semantic_comparison`` (Mann–Whitney per variable) and ``phase_means``. Planted releases show their
    ground truth beside the measured values; missing layers are listed."""
    tables = store.tables()
    classes = tables.read("feature_classes")
    if classes.empty:
        raise dg.Failure("No feature_classes rows are stored yet: materialise at least one SAE partition first.")
    frames = {name: tables.read(name) for name in
              ("semantic_null", "class_thresholds", "sae_features", "attention_participation", "feature_participation")}
    metadata: dict[str, dg.MetadataValue] = {}
    for release_id in sorted(classes["release"].unique()):
        release = get_release(str(release_id))
        folder = store.artifacts("reports") / release.id
        truth = load_truth(release.id, hub.client()).data if release.planted else None
        pick = {name: f[f["release"] == release.id] if len(f) else f for name, f in frames.items()}
        results = release_results(
            release.id, ARCHITECTURE.get(release.format, release.format), release.n_layers,
            classes[classes["release"] == release.id], pick["semantic_null"], pick["class_thresholds"],
            pick["sae_features"], pick["attention_participation"], pick["feature_participation"], truth,
        )
        plots = write_plots(results, folder)
        results.plots = {key: path.name for key, path in plots.items()}
        text = render_report(results)
        report_path = folder / "report.md"
        tmp = report_path.with_name(".report.md.tmp")
        tmp.write_text(text)
        os.replace(tmp, report_path)
        for table, frame in (("output_fraction_by_layer", results.by_layer), ("depth_profiles", results.profile),
                             ("depth_shapes", results.shapes.assign(release=release.id)),
                             ("semantic_comparison", results.comparison.assign(release=release.id)),
                             ("phase_means", results.phases)):
            if len(frame):
                metadata |= store_table(store, table, release.id, frame)
        inline = text
        for path in plots.values():
            image = base64.b64encode(path.read_bytes()).decode()
            inline = inline.replace(f"]({path.name})", f"](data:image/png;base64,{image})")
        metadata[f"{release.id}/report"] = dg.MetadataValue.md(inline)
        metadata[f"{release.id}/report_path"] = dg.MetadataValue.path(str(report_path))
        context.log.info(f"{release.id}: report at {report_path}")
    return dg.MaterializeResult(metadata=metadata)


def missing_layers(n_layers: int, by_layer) -> list[int]:
    """Layers of the model with no analysed SAE (reported, never silently skipped)."""
    return sorted(set(range(n_layers)) - set(by_layer["layer"].astype(int)))
