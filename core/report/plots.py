"""Seaborn figures written as PNG files (for the Dagster UI and the report), and the registry of a release's
plots (:data:`PLOTS`, keyed by plot name; the file names alone in :data:`PLOT_FILES`, which is all the report
needs)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from core.analysis.classify import DEFAULT_NULL  # noqa: E402
from core.store.atomic import atomic_path  # noqa: E402

if TYPE_CHECKING:
    from core.analysis.claims import ReleaseResults


def save(fig: plt.Figure, path: Path, suptitle: str | None = None) -> Path:
    """Write a figure atomically (temp file + rename) and close it; with ``suptitle``, the figure gets that title and
    a tight layout first."""
    if suptitle is not None:
        fig.suptitle(suptitle)
        fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    return path


SAMPLE_LABELS = {"feature": "SAE features", "control": "control (random, SAE's covariance)"}


def output_fraction_plot(by_layer: pd.DataFrame, release: str, path: Path, truth: float | None = None) -> Path:
    """Fraction of directions that directly predict output tokens per layer, features and control, with
    95 % Wilson intervals; the paper's ≈ 1/4 and (planted releases) the planted fraction as reference lines."""
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for i, (sample, label) in enumerate(SAMPLE_LABELS.items()):
        rows = by_layer[by_layer["sample"] == sample]
        layer, fraction = rows["layer"].to_numpy(), rows["fraction"].to_numpy()
        ax.errorbar(
            layer,
            fraction,
            yerr=[fraction - rows["ci_low"].to_numpy(), rows["ci_high"].to_numpy() - fraction],
            fmt="o-" if sample == "feature" else "s--",
            capsize=3,
            color=sns.color_palette()[i],
            label=f"{label} (95 % CI)",
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


PHASE_LABELS = {
    "encoder_embedding": "encoder–embedding phase (writer layer L: ov_writer, null z)",
    "decoder_unembedding": "decoder–unembedding phase (reader layer L+1: QK + write norm, null z)",
}
STAT_LABELS = {"mean": "mean", "median": "median", "p75": "75th percentile"}


def depth_profile_plot(
    profile: pd.DataFrame, verdicts: pd.DataFrame, release: str, path: Path, truth: pd.DataFrame | None = None
) -> Path:
    """One panel per phase: the P99 over directions of the participation score (null z; the statistic the C2
    verdict reads) of the features and of the control per SAE layer against normalised depth, their mean
    dotted, 95 % bands over directions; the C2 verdict in the title; planted
    releases: the planted strength (mean over heads, right axis)."""
    sns.set_theme(style="whitegrid")
    phases = [p for p in PHASE_LABELS if p in set(profile["phase"])]
    fig, axes = plt.subplots(
        1, max(1, len(phases)), figsize=(7.5 * max(1, len(phases)), 4.6), squeeze=False, layout="constrained"
    )
    verdict = verdicts.set_index("claim")["verdict"]
    for ax, phase in zip(axes[0], phases):
        for i, (sample, label) in enumerate(SAMPLE_LABELS.items()):
            data = profile[(profile["phase"] == phase) & (profile["sample"] == sample)].sort_values("depth")
            colour = sns.color_palette()[i]
            ax.plot(
                data["depth"], data["p99"], "o-" if sample == "feature" else "s--", color=colour, label=f"{label}: P99"
            )
            ax.fill_between(data["depth"], data["p99_low"], data["p99_high"], color=colour, alpha=0.2)
            ax.plot(data["depth"], data["mean"], ":", color=colour, label=f"{label}: mean")
        ax.set_xlabel("normalised depth of the SAE (layer / (layers − 1))")
        ax.set_ylabel("participation score over directions\n(robust z against random directions)")
        ax.set_title(f"{PHASE_LABELS[phase]}\nC2 verdict: {verdict.get(f'C2 {phase}', 'not measured')}", fontsize=10)
        ax.set_xlim(-0.03, 1.03)
        if truth is not None and phase in set(truth["phase"]):
            t = truth[truth["phase"] == phase].sort_values("depth")
            twin = ax.twinx()
            twin.plot(t["depth"], t["strength"], ":", color="black", label="planted strength (right axis)")
            twin.set_ylabel("planted strength s (mean over heads)")
            twin.grid(False)
            twin.legend(loc="upper right", fontsize=7)
        ax.legend(loc="upper left", fontsize=7)
    fig.suptitle(f"{release}: attention participation over depth, features vs control (bands: 95 % over directions)")
    return save(fig, path)


def participation_heatmap(part: pd.DataFrame, release: str, path: Path) -> Path:
    """Layer × head heatmaps (one per phase) of the mean participation score over features, annotated
    with the fraction of features that participate (score above the null P99)."""
    sns.set_theme(style="white")
    phases = [p for p in PHASE_LABELS if p in set(part["phase"])]
    fig, axes = plt.subplots(1, max(1, len(phases)), figsize=(5.5 * max(1, len(phases)), 4.2), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        data = part[(part["phase"] == phase) & (part["sample"] == "feature")]
        score = data.pivot_table(index="attn_layer", columns="head", values="score", aggfunc="mean")
        frac = data.pivot_table(index="attn_layer", columns="head", values="participates", aggfunc="mean")
        labels = score.round(2).astype(str) + "\n" + (100 * frac).round(0).astype(int).astype(str) + " %"
        sns.heatmap(
            score,
            annot=labels.to_numpy(),
            fmt="",
            cmap="viridis",
            ax=ax,
            annot_kws={"fontsize": 7},
            cbar_kws={"label": "mean score over features"},
        )
        ax.set_xlabel("query head")
        ax.set_ylabel("attention layer")
        ax.set_title(PHASE_LABELS[phase] + "\ncell: mean score / % of features participating", fontsize=9)
    return save(fig, path, suptitle=f"{release}: feature participation per layer and head")


def semantic_violins(frame: pd.DataFrame, values: dict[str, str], release: str, path: Path) -> Path:
    """One violin panel per variable (``values``: column → readable label with units), semantic vs
    non-semantic features (``frame``'s feature sample)."""
    sns.set_theme(style="whitegrid")
    cols = [c for c in values if c in frame.columns and frame[c].notna().any()]
    fig, axes = plt.subplots(1, max(1, len(cols)), figsize=(3.4 * max(1, len(cols)), 4), squeeze=False)
    feats = frame[frame["sample"] == "feature"] if "sample" in frame else frame
    data = feats.assign(group=feats["semantic"].map({True: "semantic", False: "non-semantic"}))
    for ax, col in zip(axes[0], cols):
        sns.violinplot(
            data=data,
            x="group",
            y=col,
            hue="group",
            order=["semantic", "non-semantic"],
            cut=0,
            inner="quartile",
            ax=ax,
            legend=False,
            density_norm="width",
        )
        ax.set_xlabel("")
        ax.set_ylabel(values[col], fontsize=8)
    return save(fig, path, suptitle=f"{release}: semantic vs non-semantic features (all layers)")


METRIC_LABELS = {
    "topk_z": "top-10 z-score of output logits",
    "levenshtein": "mean pairwise Levenshtein similarity (0–1)",
    "cosine": "mean pairwise cosine of token vectors",
    "concentration": "−entropy of softmax over vocabulary (nats)",
}


NULL_LABELS = {"null": "isotropic null", "matched_null": "SAE-matched null"}


def null_vs_observed_plot(
    features: pd.DataFrame, null: pd.DataFrame, thresholds: pd.DataFrame, release: str, path: Path
) -> Path:
    """Histograms (density) of each calibrated metric for the features and for each null's directions (``null``
    rows with ``sample`` null | matched_null), with the threshold (``thresholds``: the calibrating null's P99)
    as a vertical line; one panel per (side, metric)."""
    sns.set_theme(style="whitegrid")
    panels = [("output", "topk_z", "topk_z")] + [
        (side, m, f"{'out' if side == 'output' else 'in'}_{m}")
        for side in ("output", "input")
        for m in ("levenshtein", "cosine", "concentration")
    ]
    fig, axes = plt.subplots(2, 4, figsize=(15, 6.5))
    nulls = null.assign(group=null["sample"].map(NULL_LABELS))
    for ax, (side, metric, column) in zip(axes.flat, panels):
        both = pd.concat([features[[column]].assign(group="features"), nulls[[column, "group"]]]).dropna()
        sns.histplot(
            data=both,
            x=column,
            hue="group",
            stat="density",
            common_norm=False,
            bins=50,
            element="step",
            ax=ax,
            legend=ax is axes.flat[0],
        )
        ax.xaxis.set_major_locator(MaxNLocator(4))
        t = thresholds[(thresholds["side"] == side) & (thresholds["metric"] == metric)]["threshold"]
        if len(t):
            ax.axvline(float(t.median()), color="red", ls="--", label="threshold (null P99)")
        ax.set_xlabel(METRIC_LABELS[metric], fontsize=8)
        ax.set_title(f"{side} tokens", fontsize=9)
    axes.flat[-1].axis("off")
    return save(
        fig, path, suptitle=f"{release}: calibration — features vs null directions (red: threshold, median over SAEs)"
    )


def c1_sensitivity_plot(sensitivity: pd.DataFrame, release: str, path: Path) -> Path:
    """C1 (fraction output-predicting, pooled over SAEs) against the null quantile, one line per k, one panel per
    null; features solid, control dashed; the paper's P75 rule (a quarter by construction) and the C1 band."""
    sns.set_theme(style="whitegrid")
    pooled = (
        sensitivity.groupby(["rule", "null", "quantile", "k", "sample"], as_index=False)[["hits", "n"]]
        .sum()
        .assign(fraction=lambda f: f["hits"] / f["n"])
    )
    calibrated = pooled[pooled["rule"] == "null_calibrated"]
    nulls = sorted(calibrated["null"].unique())
    fig, axes = plt.subplots(1, max(1, len(nulls)), figsize=(6 * max(1, len(nulls)), 3.8), sharey=True, squeeze=False)
    paper = pooled[(pooled["rule"] == "paper_p75") & (pooled["sample"] == "feature")]["fraction"]
    for ax, null in zip(axes.flat, nulls):
        for i, k in enumerate(sorted(calibrated["k"].unique())):
            for sample, style in (("feature", "o-"), ("control", "s--")):
                rows = calibrated[
                    (calibrated["null"] == null) & (calibrated["k"] == k) & (calibrated["sample"] == sample)
                ]
                ax.plot(
                    100 * rows["quantile"],
                    rows["fraction"],
                    style,
                    color=sns.color_palette()[i],
                    label=f"k={k} {SAMPLE_LABELS[sample].split(' (')[0]}",
                )
        ax.axhspan(0.20, 0.30, color="grey", alpha=0.15, label="C1 band")
        if len(paper):
            ax.axhline(float(paper.mean()), color="red", ls=":", label="paper's P75 rule (by construction)")
        ax.set_xlabel("null quantile of every threshold (percentile)")
        ax.set_title(f"{null} null", fontsize=9)
    axes.flat[0].set_ylabel("fraction output-predicting")
    axes.flat[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return save(fig, path, suptitle=f"{release}: C1 sensitivity to the threshold quantile, k and the null")


VIOLIN_VALUES = {
    "score_encoder_embedding": "encoder–embedding participation\n(writer circuit, null z)",
    "score_decoder_unembedding": "decoder–unembedding participation\n(reader QK + write norm, null z)",
    "encoder_norm": "raw encoder norm ‖W_enc[:, i]‖",
    "decoder_norm": "raw decoder norm ‖W_dec[i]‖",
}


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


# plot name -> its PNG's file name beside the report (``<data>/reports/<release>/``); the report reads only this,
# so editing a drawing leaves the report's code version alone
PLOT_FILES = {
    "output_fraction": "c1_output_fraction.png",
    "depth_profiles": "c2_depth_profiles.png",
    "participation_heatmap": "c2_layer_head_participation.png",
    "semantic_violins": "c3_semantic_vs_non_semantic.png",
    "calibration": "calibration_null_vs_observed.png",
    "c1_sensitivity": "c1_sensitivity.png",
}


Draw = Callable[["ReleaseResults", Path], "Path | None"]


@dataclass(frozen=True)
class Plot:
    """One plot of a release: ``draw(results, path)`` writes the PNG and returns its path, or ``None`` when the
    release has nothing to draw (no attention statistics, no null rows)."""

    draw: Draw
    description: str


PLOTS: dict[str, Plot] = {
    "output_fraction": Plot(
        _output_fraction, "C1: fraction of output-predicting features (and control) per layer, 95 % Wilson CI."
    ),
    "depth_profiles": Plot(
        _depth_profiles,
        "C2: mean participation (null z) over normalised depth per phase, features vs control, C2 verdict.",
    ),
    "participation_heatmap": Plot(
        _heatmap, "C2: layer × head participation (mean score, % of features participating)."
    ),
    "semantic_violins": Plot(_violins, "C3: semantic vs non-semantic features: participation and raw weight norms."),
    "calibration": Plot(
        _calibration, "Calibration: each metric for features vs both nulls, with the matched null's P99 threshold."
    ),
    "c1_sensitivity": Plot(
        _sensitivity, "C1 against the threshold quantile, k and the null; the paper's P75 rule beside it."
    ),
}
