"""Seaborn figures written as PNG files (for the Dagster UI and the report)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402


def save(fig: plt.Figure, path: Path) -> Path:
    """Write a figure atomically (temp file + rename) and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def output_fraction_plot(by_layer: pd.DataFrame, release: str, path: Path, truth: float | None = None) -> Path:
    """Fraction of features that directly predict output tokens per layer, with 95 % Wilson intervals;
    the paper's ≈ 1/4 and (planted releases) the planted fraction as reference lines."""
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(7, 3.8))
    layer, fraction = by_layer["layer"].to_numpy(), by_layer["fraction"].to_numpy()
    ax.errorbar(
        layer,
        fraction,
        yerr=[fraction - by_layer["ci_low"].to_numpy(), by_layer["ci_high"].to_numpy() - fraction],
        fmt="o-",
        capsize=3,
        color=sns.color_palette()[0],
        label="measured (95 % CI)",
    )
    ax.axhline(0.25, ls="--", color="grey", label="paper: about 1/4")
    if truth is not None:
        ax.axhline(truth, ls=":", color=sns.color_palette()[3], label=f"planted truth: {truth:.2f}")
    ax.set_xlabel("layer of the SAE (residual stream after block)")
    ax.set_ylabel("fraction of features")
    ax.set_ylim(0, max(0.5, float(by_layer["ci_high"].max()) + 0.05))
    ax.set_title(f"{release}: features whose decoder direction directly predicts output tokens")
    ax.legend(loc="upper right", fontsize=8)
    return save(fig, path)
