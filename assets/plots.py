"""One asset per plot (``core.plots``): a PNG per release under ``<data>/reports/<release>/``, embedded in
the asset's metadata for the Dagster UI (``[Show Markdown]`` opens it, scaled to fit: ``UI_PLOT_WIDTH``)."""

import base64
import io
from collections.abc import Callable
from pathlib import Path

import dagster as dg
from PIL import Image

from core.claims import ReleaseResults
from core.classify import DEFAULT_NULL
from core.plots import (
    c1_sensitivity_plot,
    depth_profile_plot,
    null_vs_observed_plot,
    output_fraction_plot,
    participation_heatmap,
    semantic_violins,
)
from assets.claims import stored_results
from orchestration.resources import HubResource, StoreResource

VIOLIN_VALUES = {
    "score_encoder_embedding": "encoder–embedding participation\n(writer circuit, null z)",
    "score_decoder_unembedding": "decoder–unembedding participation\n(reader QK + write norm, null z)",
    "encoder_norm": "raw encoder norm ‖W_enc[:, i]‖",
    "decoder_norm": "raw decoder norm ‖W_dec[i]‖",
}

Draw = Callable[[ReleaseResults, Path], Path | None]

# Dagster's UI shows markdown metadata of 1000 characters or more (any data-URI plot) behind "[Show Markdown]",
# in a dialog at most 80 % of the window wide, images at their pixel size (raw HTML such as <img width> is not
# rendered): 1080 px fits that dialog whole in windows from 1400 px wide
UI_PLOT_WIDTH = 1080


def _output_fraction(r: ReleaseResults, path: Path) -> Path:
    return output_fraction_plot(r.by_layer, r.release, path, r.truth.output.truth_fraction if r.truth else None)


def _depth_profiles(r: ReleaseResults, path: Path) -> Path | None:
    return None if r.profile.empty else depth_profile_plot(r.profile, r.verdicts, r.release, path, r.truth_strength)


def _heatmap(r: ReleaseResults, path: Path) -> Path | None:
    return None if r.head_participation.empty else participation_heatmap(r.head_participation, r.release, path)


def _violins(r: ReleaseResults, path: Path) -> Path:
    return semantic_violins(r.per_feature, VIOLIN_VALUES, r.release, path)


def _calibration(r: ReleaseResults, path: Path) -> Path | None:
    feats = r.per_feature[r.per_feature["sample"] == "feature"]
    thresholds = r.thresholds[r.thresholds["null"] == DEFAULT_NULL] if "null" in r.thresholds else r.thresholds
    return None if r.null_rows.empty else null_vs_observed_plot(feats, r.null_rows, thresholds, r.release, path)


def _sensitivity(r: ReleaseResults, path: Path) -> Path | None:
    return None if r.sensitivity.empty else c1_sensitivity_plot(r.sensitivity, r.release, path)


# asset name -> (file name, drawing function, what the plot shows)
PLOTS: dict[str, tuple[str, Draw, str]] = {
    "plot_output_fraction": ("c1_output_fraction.png", _output_fraction,
                             "C1: fraction of output-predicting features (and control) per layer, 95 % Wilson CI."),
    "plot_depth_profiles": ("c2_depth_profiles.png", _depth_profiles,
                            "C2: mean participation (null z) over normalised depth per phase, features vs control, C2 verdict."),
    "plot_participation_heatmap": ("c2_layer_head_participation.png", _heatmap,
                                   "C2: layer × head participation (mean score, % of features participating)."),
    "plot_semantic_violins": ("c3_semantic_vs_non_semantic.png", _violins,
                              "C3: semantic vs non-semantic features: participation and raw weight norms."),
    "plot_calibration": ("calibration_null_vs_observed.png", _calibration,
                         "Calibration: each metric for features vs both nulls, with the matched null's P99 threshold."),
    "plot_c1_sensitivity": ("c1_sensitivity.png", _sensitivity,
                            "C1 against the threshold quantile, k and the null; the paper's P75 rule beside it."),
}


def fitted_png(path: Path, width: int) -> bytes:
    """The PNG at ``path``, scaled down (Lanczos) to ``width`` pixels if it is wider."""
    with Image.open(path) as image:
        if image.width <= width:
            return path.read_bytes()
        small = image.resize((width, round(image.height * width / image.width)), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    small.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def png_data_uri(path: Path, width: int = UI_PLOT_WIDTH) -> str:
    """A PNG file as a ``data:`` URI at most ``width`` pixels wide, so markdown metadata shows it in the UI
    without file access, and whole (the file itself keeps its full resolution)."""
    return f"data:image/png;base64,{base64.b64encode(fitted_png(path, width)).decode()}"


def plot_asset(name: str, file_name: str, draw: Draw, description: str) -> dg.AssetsDefinition:
    """The asset drawing one plot for every release in ``claim_statistics``."""

    @dg.asset(name=name, group_name="plots", kinds={"seaborn"}, description=description, deps=["claim_statistics"])
    def _plot(store: StoreResource, hub: HubResource) -> dg.MaterializeResult:
        metadata: dict[str, dg.MetadataValue] = {}
        for release, results in stored_results(store, hub).items():
            target = store.artifacts("reports") / release / file_name
            path = draw(results, target)
            if path is None:  # nothing to draw this time: no older file may stand in for it in the report
                target.unlink(missing_ok=True)
                metadata[f"{release}/plot"] = dg.MetadataValue.text("no data for this plot (no attention statistics)")
                continue
            metadata[f"{release}/plot"] = dg.MetadataValue.md(f"![{release}: {description}]({png_data_uri(path)})")
            metadata[f"{release}/path"] = dg.MetadataValue.path(str(path))
        return dg.MaterializeResult(metadata=metadata)

    return _plot


PLOT_ASSETS = [plot_asset(name, *spec) for name, spec in PLOTS.items()]


def write_plots(results: ReleaseResults, folder: Path) -> dict[str, Path]:
    """Every plot of one release into ``folder`` (what the plot assets do, without Dagster)."""
    paths = {name: draw(results, folder / file_name) for name, (file_name, draw, _) in PLOTS.items()}
    return {name: path for name, path in paths.items() if path is not None}
