"""One asset per plot (``core.report.plots``): a PNG per release under ``<data>/reports/<release>/``, embedded in
the asset's metadata for the Dagster UI (``[Show Markdown]`` opens it, scaled to fit: ``UI_PLOT_WIDTH``)."""

import base64
import io
from pathlib import Path

import dagster as dg
from PIL import Image

from assets.claims import stored_results
from core.report.plots import PLOT_FILES, PLOTS, Draw
from orchestration.resources import HubResource, StoreResource

# Dagster's UI shows markdown metadata of 1000 characters or more (any data-URI plot) behind "[Show Markdown]",
# in a dialog at most 80 % of the window wide, images at their pixel size (raw HTML such as <img width> is not
# rendered): 1080 px fits that dialog whole in windows from 1400 px wide
UI_PLOT_WIDTH = 1080


def asset_name(plot: str) -> str:
    """The plot asset's name for a plot of ``core.report.plots.PLOTS``: ``plot_<name>``."""
    return f"plot_{plot}"


def fitted_png(path: Path, width: int) -> bytes:
    """The PNG at ``path``, scaled down (Lanczos) to ``width`` pixels if it is wider."""
    with Image.open(path) as image:
        if image.width <= width:
            return path.read_bytes()
        small = image.resize((width, round(image.height * width / image.width)), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    small.save(buffer, format="PNG")  # optimize=True: 1 % smaller, 3x the time
    return buffer.getvalue()


def png_data_uri(path: Path, width: int = UI_PLOT_WIDTH) -> str:
    """A PNG file as a ``data:`` URI at most ``width`` pixels wide, so markdown metadata shows it in the UI
    without file access, and whole (the file itself keeps its full resolution)."""
    return f"data:image/png;base64,{base64.b64encode(fitted_png(path, width)).decode()}"


def plot_asset(name: str, file_name: str, draw: Draw, description: str) -> dg.AssetsDefinition:
    """The asset drawing plot ``name`` (``draw``: ``core.report.plots.PLOTS[name].draw``) for every release in
    ``claim_statistics``. The drawing function and the literals are captured one by one, so a plot's code
    version reaches its own drawing code only (``orchestration.versions``)."""

    @dg.asset(
        name=asset_name(name), group_name="plots", kinds={"seaborn"}, description=description, deps=["claim_statistics"]
    )
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


PLOT_ASSETS = [plot_asset(name, PLOT_FILES[name], plot.draw, plot.description) for name, plot in PLOTS.items()]
