"""Which features directly predict output tokens, from their output-lens statistics.

Statistic (per feature, from the decoder–unembedding lens): the top-k z-score
``z = (mean of the k largest logits − mean logit) / std of the logits`` over the whole vocabulary —
how far the feature's best tokens stand out of its own logit distribution (a heavy upper tail, the
weight-only analogue of Gurnee et al.'s prediction-neuron kurtosis criterion).

Threshold: calibrated, not guessed — the ``quantile`` (default 0.99) of the same statistic over random
unit directions pushed through the same lens (``core.output_lens.null_directions``), so about 1 % of
directions with no structure pass. A pooled percentile over the features themselves is deliberately
not used: it would make any target fraction true by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from core.statistics import null_threshold

DEFAULT_QUANTILE = 0.99


@dataclass(frozen=True)
class OutputPrediction:
    """Per-feature calls and the calibration that produced them."""

    calls: pd.DataFrame  # row, topk_z, output_predicting
    threshold: float
    quantile: float
    null_size: int


def topk_zscore(summary: pd.DataFrame) -> pd.Series:
    """``(top_mean - mean) / std`` for each row of a ``core.frames.summary_frame``."""
    return (summary["top_mean"] - summary["mean"]) / summary["std"]


def classify_output_prediction(
    features: pd.DataFrame, null: pd.DataFrame, quantile: float = DEFAULT_QUANTILE
) -> OutputPrediction:
    """Call a feature output-predicting when its top-k z-score exceeds the null ``quantile``."""
    threshold = null_threshold(topk_zscore(null).to_numpy(), quantile)
    z = topk_zscore(features)
    calls = pd.DataFrame({"row": features["row"], "topk_z": z, "output_predicting": z > threshold})
    return OutputPrediction(calls=calls, threshold=threshold, quantile=quantile, null_size=len(null))
