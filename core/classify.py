"""Feature classes from the vocabulary lenses: heavy-tailed, semantic (per side), output-predicting.

1. Heavy-tailed output lens. Statistic (per feature, decoder–unembedding lens): the top-k z-score
   ``z = (mean of the k largest logits − mean logit) / std of the logits`` over the whole vocabulary —
   how far the feature's best tokens stand out of its own logit distribution (the weight-only analogue
   of Gurnee et al.'s prediction-neuron kurtosis criterion). Threshold: the ``quantile`` (default 0.99)
   of the same statistic over random unit directions pushed through the same lens (the null rows,
   ``core.output_lens.null_directions``). A pooled percentile over the features themselves is
   deliberately not used: it would make any target fraction true by construction.
2. Semantic, per side (``core.semantic``): coherence of the top-k output (resp. input) tokens by
   Levenshtein, embedding cosine and softmax concentration, each at its null P99; majority rule.
3. **Output-predicting** (claim C1) = heavy-tailed AND semantic on the output side: the feature's
   decoder direction singles out a few tokens AND those tokens form a coherent set. The null rows are
   classified by the same rule, so ``null_rate`` — the fraction of null directions that pass — is the
   calibrated false-positive rate of the whole rule (≤ 1 − quantile; in-sample on the null).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.semantic import METRICS, Calibration, classify_side, coherence_metrics
from core.statistics import DEFAULT_QUANTILE, null_threshold



def topk_zscore(summary: pd.DataFrame) -> pd.Series:
    """``(top_mean - mean) / std`` for each row of a ``core.frames.summary_frame``."""
    return (summary["top_mean"] - summary["mean"]) / summary["std"]


@dataclass(frozen=True)
class FeatureClasses:
    """Every row (features and null directions, told apart by ``sample``) with its class columns, and the
    thresholds used (``thresholds``: ``side, metric, threshold, null_median, quantile, null_size``) and
    the null distributions' quantiles (``null_quantiles``: ``side, metric, q, value``)."""

    rows: pd.DataFrame
    thresholds: pd.DataFrame
    null_quantiles: pd.DataFrame

    @property
    def features(self) -> pd.DataFrame:
        return self.rows[self.rows["sample"] == "feature"].drop(columns="sample").reset_index(drop=True)

    @property
    def null_rate(self) -> float:
        """Fraction of null directions called output-predicting (the rule's calibrated false-positive rate)."""
        null = self.rows[self.rows["sample"] == "null"]
        return float(null["output_predicting"].mean()) if len(null) else float("nan")


def _side_columns(frame: pd.DataFrame, side: str) -> pd.DataFrame:
    prefix = "out" if side == "output" else "in"
    keep = {m: f"{prefix}_{m}" for m in METRICS} | {
        "n_passes": f"{prefix}_n_passes",
        "semantic_score": f"{prefix}_semantic_score",
        "semantic": f"semantic_{side}",
    }
    return frame[["sample", "feature", *keep]].rename(columns=keep)


def _calibration_frames(side: str, calibration: Calibration) -> tuple[pd.DataFrame, pd.DataFrame]:
    return calibration.as_frame().assign(side=side), calibration.null_quantiles.assign(side=side)


def classify_features(
    output_tokens: pd.DataFrame,
    output_stats: pd.DataFrame,
    input_tokens: pd.DataFrame,
    input_stats: pd.DataFrame,
    unembedding: np.ndarray,
    embedding: np.ndarray,
    quantile: float = DEFAULT_QUANTILE,
) -> FeatureClasses:
    """All classes for one SAE from its lens tables (rows with ``sample`` 'feature' / 'null', ``feature``)
    and the model's (vocab, d) unembedding / embedding matrices.

    Columns: ``sample, feature, topk_z, heavy_tailed, out_{levenshtein,cosine,concentration,n_passes,
    semantic_score}, semantic_output, in_{...}, semantic_input, semantic`` (either side),
    ``semantic_score`` (max of the two sides), ``output_predicting`` (heavy_tailed AND semantic_output),
    ``threshold`` (top-k z threshold), ``null_quantile``, ``null_size``."""
    null_stats = output_stats[output_stats["sample"] == "null"]
    threshold = null_threshold(topk_zscore(null_stats).to_numpy(), quantile)
    base = output_stats[["sample", "feature"]].copy()
    base["topk_z"] = topk_zscore(output_stats).to_numpy()
    base["heavy_tailed"] = base["topk_z"] > threshold
    thresholds = [
        pd.DataFrame(
            {"side": ["output"], "metric": ["topk_z"], "threshold": [threshold],
             "null_median": [float(np.median(topk_zscore(null_stats)))], "quantile": [quantile],
             "null_size": [len(null_stats)]}
        )
    ]
    z_grid = [(q, float(np.quantile(topk_zscore(null_stats), q))) for q in (0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999)]
    null_q = [pd.DataFrame({"side": "output", "metric": "topk_z", "q": [q for q, _ in z_grid], "value": [v for _, v in z_grid]})]
    rows = base
    for side, tokens, stats, vectors in (
        ("output", output_tokens, output_stats, unembedding),
        ("input", input_tokens, input_stats, embedding),
    ):
        classified, calibration = classify_side(coherence_metrics(tokens, stats, vectors), quantile)
        rows = rows.merge(_side_columns(classified, side), on=["sample", "feature"], how="left", validate="1:1")
        t, q = _calibration_frames(side, calibration)
        thresholds.append(t)
        null_q.append(q)
    rows["semantic"] = rows["semantic_output"] | rows["semantic_input"]
    rows["semantic_score"] = np.maximum(rows["out_semantic_score"], rows["in_semantic_score"])
    rows["output_predicting"] = rows["heavy_tailed"] & rows["semantic_output"]
    rows = rows.assign(threshold=threshold, null_quantile=quantile, null_size=len(null_stats))
    return FeatureClasses(
        rows=rows.sort_values(["sample", "feature"], ignore_index=True),
        thresholds=pd.concat(thresholds, ignore_index=True)[["side", "metric", "threshold", "null_median", "quantile", "null_size"]],
        null_quantiles=pd.concat(null_q, ignore_index=True)[["side", "metric", "q", "value"]],
    )
