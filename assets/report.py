"""Report asset: the paper's claims measured over every stored SAE, per release, with plots."""

import base64
import os

import dagster as dg

from assets.common import store_table
from core.claims import output_fraction_by_layer, recovery, render_report
from core.plots import output_fraction_plot
from core.truth import load_truth
from core.registry import get_release
from orchestration.resources import HubResource, StoreResource

PLOT_NAME = "c1_output_fraction.png"


@dg.asset(
    group_name="report",
    deps=[dg.AssetDep("feature_classes", partition_mapping=dg.AllPartitionMapping())],
    kinds={"markdown", "seaborn"},
)
def claims_report(context: dg.AssetExecutionContext, hub: HubResource, store: StoreResource) -> dg.MaterializeResult:
    """One markdown report per release under ``<data>/reports/<release>/report.md`` with its plots, and
    table ``output_fraction_by_layer`` (``release, layer, sae_id, n, hits, fraction, ci_low, ci_high``).
    Planted releases show their ground truth beside the measured values."""
    classes = store.tables().read("feature_classes")
    if classes.empty:
        raise dg.Failure("No feature_classes rows are stored yet: materialise at least one SAE partition first.")
    metadata: dict[str, dg.MetadataValue] = {}
    for release_id, by_layer in output_fraction_by_layer(classes).groupby("release"):
        release = get_release(str(release_id))
        folder = store.artifacts("reports") / release.id
        truth = load_truth(release.id, hub.client()) if release.planted else None
        measured = classes[classes.release == release.id]
        planted = recovery(measured, truth.output_features()) if truth else None
        plot = output_fraction_plot(by_layer, release.id, folder / PLOT_NAME, planted.truth_fraction if planted else None)
        text = render_report(release.id, by_layer, PLOT_NAME, planted, missing_layers(release.n_layers, by_layer))
        report_path = folder / "report.md"
        tmp = report_path.with_name(".report.md.tmp")
        tmp.write_text(text)
        os.replace(tmp, report_path)
        metadata |= store_table(store, "output_fraction_by_layer", release.id, by_layer)
        image = base64.b64encode(plot.read_bytes()).decode()
        metadata[f"{release.id}/report"] = dg.MetadataValue.md(
            text.replace(f"]({PLOT_NAME})", f"](data:image/png;base64,{image})")
        )
        metadata[f"{release.id}/report_path"] = dg.MetadataValue.path(str(report_path))
        context.log.info(f"{release.id}: report at {report_path}")
    return dg.MaterializeResult(metadata=metadata)


def missing_layers(n_layers: int, by_layer) -> list[int]:
    """Layers of the model with no analysed SAE (reported, never silently skipped)."""
    return sorted(set(range(n_layers)) - set(by_layer["layer"].astype(int)))
