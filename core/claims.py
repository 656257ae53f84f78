"""The paper's claims, measured: values, verdicts and the markdown report.

C1 (arXiv 2601.22447): "about one quarter of features directly predict output tokens". Measured as the
fraction of features called output-predicting by ``core.classify`` (null-calibrated top-k z-score),
per layer with 95 % Wilson intervals, and over the release. Verdict: *consistent* when the release-wide
interval overlaps [0.20, 0.30], else *not reproduced*. C2–C4 (attention depth profiles, semantic vs
non-semantic, phase means) need the attention circuits and are reported as not measured until then.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from core.statistics import wilson_interval

PAPER_C1 = "About one quarter of SAE features directly predict output tokens."
C1_BAND = (0.20, 0.30)


def output_fraction_by_layer(classes: pd.DataFrame) -> pd.DataFrame:
    """Per (release, layer, sae_id): n features, hits, fraction and its 95 % Wilson interval."""
    grouped = classes.groupby(["release", "layer", "sae_id"], as_index=False).agg(
        n=("feature", "size"), hits=("output_predicting", "sum")
    )
    grouped["fraction"] = grouped["hits"] / grouped["n"]
    intervals = [wilson_interval(int(h), int(n)) for h, n in zip(grouped["hits"], grouped["n"])]
    grouped["ci_low"] = [lo for lo, _ in intervals]
    grouped["ci_high"] = [hi for _, hi in intervals]
    return grouped.sort_values(["release", "layer", "sae_id"], ignore_index=True)


@dataclass(frozen=True)
class Recovery:
    """How well the calls recover a planted truth set of output-predicting features."""

    truth_fraction: float
    precision: float
    recall: float


def recovery(classes: pd.DataFrame, truth: dict[str, set[int]]) -> Recovery:
    """Precision/recall of ``output_predicting`` against planted feature sets per sae_id."""
    tp = fp = fn = total = 0
    for sae_id, rows in classes.groupby("sae_id"):
        planted = truth.get(str(sae_id), set())
        called = set(rows.loc[rows.output_predicting, "feature"].astype(int))
        tp, fp, fn = tp + len(called & planted), fp + len(called - planted), fn + len(planted - called)
        total += len(rows)
    truth_size = tp + fn
    return Recovery(
        truth_fraction=truth_size / total if total else float("nan"),
        precision=tp / (tp + fp) if tp + fp else float("nan"),
        recall=tp / truth_size if truth_size else float("nan"),
    )


def render_report(
    release: str, by_layer: pd.DataFrame, plot_name: str, truth: Recovery | None, missing_layers: list[int]
) -> str:
    """Markdown: the claim, the measured value, the verdict, the plot, planted truth when known, and the
    layers with no SAE analysed."""
    n, hits = int(by_layer["n"].sum()), int(by_layer["hits"].sum())
    low, high = wilson_interval(hits, n)
    fraction = hits / n if n else float("nan")
    verdict = "consistent" if low <= C1_BAND[1] and high >= C1_BAND[0] else "not reproduced"
    lines = [
        f"# {release}: weight-only claims report",
        "",
        f"SAEs analysed: {len(by_layer)} (layers {', '.join(map(str, by_layer['layer'].tolist()))}); "
        f"features: {n}."
        + (f" **Layers without an analysed SAE: {', '.join(map(str, missing_layers))}.**" if missing_layers else ""),
        "",
        "| claim | paper | measured here | verdict |",
        "|---|---|---|---|",
        f"| C1 output-predicting fraction | {PAPER_C1} | {fraction:.3f} (95 % CI {low:.3f}–{high:.3f}) | {verdict} |",
        "| C2 attention depth profiles | U / inverted-U over depth | not measured yet (attention circuits) | — |",
        "| C3 semantic vs non-semantic | distributions and magnitudes differ | not measured yet | — |",
        "| C4 phase means | decoder–unembedding higher on Llama | not measured yet | — |",
        "",
    ]
    if truth is not None:
        lines += [
            "## Planted ground truth",
            "",
            f"Planted output-predicting fraction {truth.truth_fraction:.3f}; measured {fraction:.3f}; "
            f"precision {truth.precision:.3f}, recall {truth.recall:.3f}.",
            "",
        ]
    lines += [
        "## C1 by layer",
        "",
        f"![output-predicting fraction by layer]({plot_name})",
        "",
        by_layer[["layer", "sae_id", "n", "hits", "fraction", "ci_low", "ci_high"]].to_markdown(index=False, floatfmt=".3f"),
        "",
        "Method: a feature is output-predicting when the mean of its top-10 output-lens logits stands "
        "out of its own logit distribution (z-score) above the 99th percentile of the same statistic "
        "on random unit directions (see core/classify.py).",
        "",
    ]
    return "\n".join(lines)
