"""The claim-by-claim report: one markdown file per release beside its plots, and in the UI."""

import dagster as dg

from assets.claims import stored_results
from assets.plots import asset_name, png_data_uri
from core.analysis.claims import render_report
from core.report.plots import PLOT_FILES
from core.store import atomic
from orchestration.resources import HubResource, StoreResource


@dg.asset(group_name="report", deps=["claim_statistics", *map(asset_name, PLOT_FILES)], kinds={"markdown"})
def claims_report(context: dg.AssetExecutionContext, store: StoreResource, hub: HubResource) -> dg.MaterializeResult:
    """``<data>/reports/<release>/report.md`` per release (``core.analysis.claims.render_report``): for each claim
    the paper's statement, the value measured here, the verdict and the plot; planted releases show their
    ground truth beside the measured values; layers without an analysed SAE are listed. Reads what
    ``claim_statistics`` stored and the PNGs the plot assets drew (a plot with nothing to draw leaves none)."""
    metadata: dict[str, dg.MetadataValue] = {}
    for release, results in stored_results(store, hub).items():
        folder = store.artifacts("reports") / release
        plots = {name: folder / file_name for name, file_name in PLOT_FILES.items() if (folder / file_name).exists()}
        text = render_report(results, {name: path.name for name, path in plots.items()})
        report_path = folder / "report.md"
        atomic.write_text(report_path, text)
        inline = text
        for path in plots.values():
            inline = inline.replace(f"]({path.name})", f"]({png_data_uri(path)})")
        metadata[f"{release}/report"] = dg.MetadataValue.md(inline)
        metadata[f"{release}/report_path"] = dg.MetadataValue.path(str(report_path))
        context.log.info(f"{release}: report at {report_path}")
    return dg.MaterializeResult(metadata=metadata)
