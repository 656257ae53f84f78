"""Semantic coherence of a feature's top-k vocabulary tokens, with null-calibrated thresholds.

A feature is *semantic* on one side (``"output"``: its decoder direction through the output lens;
``"input"``: its encoder direction against the embeddings) when its top-k tokens form a coherent set.
Three coherence metrics per (sample, feature, side) — all "larger = more coherent":

(a) ``levenshtein``: mean over the k(k-1)/2 pairs of top tokens of rapidfuzz's normalised Levenshtein
    similarity ``1 - dist(a, b) / max(|a|, |b|)`` on normalised strings (``normalise_token``: the
    tokenizer's space markers 'Ġ' / '▁' and surrounding whitespace stripped, case-folded). A pair with
    an empty normalised string (whitespace / marker-only tokens) scores 0, not rapidfuzz's 1.
(b) ``cosine``: mean pairwise cosine similarity of the model's own vectors of those tokens — the
    unembedding rows (``lm_head``; = embedding when tied) on the output side, the embedding rows on the
    input side (raw rows: no norm gain, no centring).
(c) ``concentration``: ``-softmax_entropy`` of the softmax over the whole vocabulary (from the
    ``*_stats`` tables), so a peaked distribution scores high.

Calibration (never a guessed constant): each metric's threshold is the ``quantile`` (default P99) of
the same metric on the NULL rows (random unit directions through the same lens, ``sample == 'null'``)
of the same SAE, so each single test has a false-positive rate of ``1 - quantile`` on the null.

THE RULE (the only place it is defined, ``combine``): a side is semantic when AT LEAST TWO of the three
tests pass (majority vote). Why: each metric has a blind spot — Levenshtein misses synonym sets
("car, vehicle, truck"), cosine is inflated by anisotropic embeddings, concentration only says the
distribution is peaked, not that its peak is coherent — and requiring two independent kinds of
evidence keeps the null false-positive rate well under ``1 - quantile``. Continuous version (for
AUROC and plots): each metric is rescaled to ``(x - null median) / (null threshold - null median)``
(1 = at its threshold) and the ``semantic_score`` is the second largest of the three, so
``semantic == semantic_score > 1`` exactly. A feature is semantic overall (``semantic``) when either
side is (the score: the larger of the two sides' scores).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from core.statistics import DEFAULT_QUANTILE

METRICS = ("levenshtein", "cosine", "concentration")
SPACE_MARKERS = ("Ġ", "▁")
MIN_PASSES = 2  # of len(METRICS): the majority rule


def normalise_token(token: str) -> str:
    """Token string without the tokenizer's space markers ('Ġ', '▁') and outer whitespace, case-folded."""
    for marker in SPACE_MARKERS:
        token = token.replace(marker, " ")
    return token.strip().casefold()


def levenshtein_coherence(tokens: list[str]) -> float:
    """Mean pairwise normalised Levenshtein similarity of the normalised tokens (empty strings score 0)."""
    forms = [normalise_token(t) for t in tokens]
    k = len(forms)
    if k < 2:
        return float("nan")
    sim = process.cdist(forms, forms, scorer=Levenshtein.normalized_similarity, dtype=np.float32)
    empty = np.array([f == "" for f in forms])
    sim[empty, :] = 0.0
    sim[:, empty] = 0.0
    return float((sim.sum() - np.trace(sim)) / (k * (k - 1)))


def cosine_coherence(token_ids: np.ndarray, vectors: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Mean pairwise (off-diagonal) cosine similarity of ``vectors[token_ids[r]]`` for each row r of the
    (n, k) id matrix; ``vectors`` is (vocab, d). Chunked over rows to bound memory (n·k·d floats)."""
    n, k = token_ids.shape
    out = np.empty(n, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1)
    norms[norms == 0] = 1.0
    for start in range(0, n, chunk):
        ids = token_ids[start : start + chunk]
        v = vectors[ids] / norms[ids][..., None]  # (c, k, d) unit rows
        gram = np.einsum("ckd,cjd->ckj", v, v)
        out[start : start + chunk] = (gram.sum(axis=(1, 2)) - np.trace(gram, axis1=1, axis2=2)) / (k * (k - 1))
    return out


def coherence_metrics(tokens: pd.DataFrame, stats: pd.DataFrame, vectors: np.ndarray) -> pd.DataFrame:
    """The three metrics per (sample, feature) of one SAE and one side.

    ``tokens``: rows of an ``*_lens_tokens`` table (``sample, feature, side, rank, token_id, token``; only
    ``side == 'top'`` is used); ``stats``: the matching ``*_lens_stats`` rows (``sample, feature,
    softmax_entropy``); ``vectors``: (vocab, d) unembedding (output side) or embedding (input side).
    Returns ``sample, feature, levenshtein, cosine, concentration``."""
    top = tokens[tokens["side"] == "top"].sort_values(["sample", "feature", "rank"])
    grouped = top.groupby(["sample", "feature"], sort=True)
    keys = list(grouped.groups.keys())
    token_lists = grouped["token"].apply(list)
    ids = np.stack(grouped["token_id"].apply(lambda s: s.to_numpy(dtype=np.int64)).to_numpy())
    frame = pd.DataFrame(keys, columns=["sample", "feature"])
    frame["levenshtein"] = [levenshtein_coherence(t) for t in token_lists.to_numpy()]
    frame["cosine"] = cosine_coherence(ids, np.asarray(vectors, dtype=np.float32))
    entropy = stats.set_index(["sample", "feature"])["softmax_entropy"]
    frame["concentration"] = -entropy.reindex(pd.MultiIndex.from_tuples(keys)).to_numpy()
    return frame


@dataclass(frozen=True)
class Calibration:
    """Per metric: the null's median and threshold (its ``quantile``), and the null's quantile table."""

    thresholds: dict[str, float]
    medians: dict[str, float]
    quantile: float
    null_size: int
    null_quantiles: pd.DataFrame  # metric, q, value

    def as_frame(self) -> pd.DataFrame:
        """One row per metric: ``metric, threshold, null_median, quantile, null_size``."""
        return pd.DataFrame(
            {
                "metric": list(self.thresholds),
                "threshold": list(self.thresholds.values()),
                "null_median": [self.medians[m] for m in self.thresholds],
                "quantile": self.quantile,
                "null_size": self.null_size,
            }
        )


NULL_QUANTILE_GRID = (0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999)


def calibrate(null: pd.DataFrame, quantile: float = DEFAULT_QUANTILE, metrics: tuple[str, ...] = METRICS) -> Calibration:
    """Thresholds = the ``quantile`` of each metric over the null rows (linear interpolation)."""
    if len(null) == 0:
        raise ValueError("cannot calibrate semantic thresholds on an empty null")
    values = {m: null[m].dropna().to_numpy(dtype=np.float64) for m in metrics}
    grid = pd.DataFrame(
        [(m, q, float(np.quantile(values[m], q))) for m in metrics for q in NULL_QUANTILE_GRID],
        columns=["metric", "q", "value"],
    )
    return Calibration(
        thresholds={m: float(np.quantile(values[m], quantile)) for m in metrics},
        medians={m: float(np.median(values[m])) for m in metrics},
        quantile=quantile,
        null_size=len(null),
        null_quantiles=grid,
    )


def combine(metrics: pd.DataFrame, calibration: Calibration) -> pd.DataFrame:
    """Apply THE RULE: per row, pass flags ``<metric>_pass``, rescaled scores, ``n_passes``,
    ``semantic_score`` (second-largest rescaled score) and ``semantic`` (``n_passes >= MIN_PASSES``)."""
    out = metrics.copy()
    scaled = []
    for m in calibration.thresholds:
        t, med = calibration.thresholds[m], calibration.medians[m]
        out[f"{m}_pass"] = out[m] > t
        scale = (t - med) if t > med else 1.0
        scaled.append(((out[m] - med) / scale).fillna(-np.inf).to_numpy())
    stacked = np.sort(np.stack(scaled, axis=1), axis=1)  # ascending
    out["n_passes"] = out[[f"{m}_pass" for m in calibration.thresholds]].sum(axis=1).astype(int)
    out["semantic_score"] = stacked[:, -MIN_PASSES]
    out["semantic"] = out["n_passes"] >= MIN_PASSES
    return out


def classify_side(metrics: pd.DataFrame, quantile: float = DEFAULT_QUANTILE) -> tuple[pd.DataFrame, Calibration]:
    """Calibrate on the ``sample == 'null'`` rows and classify every row (features and null alike)."""
    calibration = calibrate(metrics[metrics["sample"] == "null"], quantile)
    return combine(metrics, calibration), calibration
