"""Unit tests of the semantic tests and the feature classes on small synthetic frames."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.classify import classify_features, topk_zscore
from core.semantic import (
    MIN_PASSES,
    calibrate,
    classify_side,
    coherence_metrics,
    combine,
    cosine_coherence,
    levenshtein_coherence,
    normalise_token,
)


def test_normalise_token_strips_markers_and_case():
    assert normalise_token("ĠCart") == "cart"
    assert normalise_token("▁Carts ") == "carts"
    assert normalise_token(" ") == ""


def test_levenshtein_coherence():
    assert levenshtein_coherence([" cart", "Cart", "ĠCART"]) == pytest.approx(1.0)
    low = levenshtein_coherence(["apple", "zebra", "quiet"])
    assert 0 <= low < 0.3
    # whitespace-only tokens count 0, not rapidfuzz's 1 for two empty strings
    assert levenshtein_coherence([" ", "\n", "Ġ"]) == 0.0
    # mean of the off-diagonal pairs: "ab"/"ab" = 1, "ab"/"cd" = 0 twice
    assert levenshtein_coherence(["ab", "ab", "cd"]) == pytest.approx(1 / 3)


def test_cosine_coherence_matches_direct_computation():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 8)).astype(np.float32)
    ids = rng.integers(0, 50, (7, 4))
    got = cosine_coherence(ids, vectors, chunk=3)
    for r in range(7):
        v = vectors[ids[r]] / np.linalg.norm(vectors[ids[r]], axis=1, keepdims=True)
        g = v @ v.T
        assert got[r] == pytest.approx((g.sum() - np.trace(g)) / 12, abs=1e-5)


def synthetic_side(n_null=400, n_coherent=30, n_random=70, seed=0):
    """Metric rows: null and random features ~ N(0, 1) per metric; coherent features shifted by 5."""
    rng = np.random.default_rng(seed)
    rows = []
    for sample, n, shift in (("null", n_null, 0.0), ("feature", n_coherent, 5.0), ("feature", n_random, 0.0)):
        base = len([r for r in rows if r["sample"] == sample])
        for i in range(n):
            rows.append({"sample": sample, "feature": base + i, "levenshtein": rng.normal(shift), "cosine": rng.normal(shift),
                         "concentration": rng.normal(shift)})
    return pd.DataFrame(rows)


def test_calibration_is_the_null_quantile_and_rule_is_majority():
    metrics = synthetic_side()
    classified, cal = classify_side(metrics, quantile=0.95)
    null = metrics[metrics["sample"] == "null"]
    for m in ("levenshtein", "cosine", "concentration"):
        assert cal.thresholds[m] == pytest.approx(np.quantile(null[m], 0.95))
    assert set(cal.null_quantiles["metric"]) == {"levenshtein", "cosine", "concentration"}
    # the rule: semantic iff at least two tests pass, iff the second-largest rescaled score > 1
    assert (classified["semantic"] == (classified["n_passes"] >= MIN_PASSES)).all()
    assert (classified["semantic"] == (classified["semantic_score"] > 1)).all()
    feats = classified[classified["sample"] == "feature"]
    assert feats.iloc[:30]["semantic"].all()
    assert feats.iloc[30:]["semantic"].mean() < 0.05
    # two-of-three at P95 each: false-positive rate on the null well under 5 %
    assert classified[classified["sample"] == "null"]["semantic"].mean() < 0.03


def test_one_metric_alone_is_not_enough():
    null = pd.DataFrame({"sample": "null", "feature": range(100), "levenshtein": np.linspace(0, 1, 100),
                         "cosine": np.linspace(0, 1, 100), "concentration": np.linspace(0, 1, 100)})
    cal = calibrate(null, 0.99)
    rows = pd.DataFrame({"sample": "feature", "feature": [0, 1, 2], "levenshtein": [5.0, 5.0, 5.0],
                         "cosine": [0.5, 5.0, 5.0], "concentration": [0.5, 0.5, 5.0]})
    out = combine(rows, cal)
    assert out["n_passes"].tolist() == [1, 2, 3]
    assert out["semantic"].tolist() == [False, True, True]


def lens_tables(vocab: list[str], vectors: np.ndarray, groups: dict[int, list[int]], n_features: int, n_null: int, seed: int):
    """Synthetic ``*_lens_tokens`` / ``*_lens_stats`` rows: features in ``groups`` get their group's tokens
    and a peaked softmax and heavy tail; every other row gets random tokens."""
    rng = np.random.default_rng(seed)
    tok, stats = [], []
    for sample, n in (("feature", n_features), ("null", n_null)):
        for f in range(n):
            coherent = sample == "feature" and f in groups
            ids = groups[f] if coherent else rng.choice(len(vocab), 5, replace=False).tolist()
            for rank, t in enumerate(ids, 1):
                tok.append({"sample": sample, "feature": f, "side": "top", "rank": rank, "token_id": t, "token": vocab[t], "value": 1.0})
            stats.append({"sample": sample, "feature": f, "mean": 0.0, "std": 1.0,
                          "top_mean": (6.0 if coherent else 3.0) + rng.normal(0, 0.1),
                          "softmax_entropy": (2.0 if coherent else 8.0) + rng.normal(0, 0.1)})
    return pd.DataFrame(tok), pd.DataFrame(stats)


def test_classify_features_end_to_end_on_synthetic_lens():
    rng = np.random.default_rng(1)
    stems = ["cart", "bird", "lamp", "rock", "moon", "tree"]
    vocab, vec_rows, groups_tokens = [], [], {}
    centres = rng.normal(size=(len(stems), 16))
    for g, stem in enumerate(stems):
        ids = []
        for suffix in ("", "s", "er", "ing", "ed"):
            ids.append(len(vocab))
            vocab.append(" " + stem + suffix)
            vec_rows.append(centres[g] + 0.3 * rng.normal(size=16))
        groups_tokens[g] = ids
    for i in range(400):
        vocab.append("".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 5)))
        vec_rows.append(rng.normal(size=16))
    vectors = np.asarray(vec_rows, dtype=np.float32)
    groups = {f: groups_tokens[f % len(stems)] for f in range(0, 60, 3)}  # 20 of 60 features coherent
    out_tok, out_stats = lens_tables(vocab, vectors, groups, 60, 300, seed=2)
    in_tok, in_stats = lens_tables(vocab, vectors, groups, 60, 300, seed=3)
    classes = classify_features(out_tok, out_stats, in_tok, in_stats, vectors, vectors, quantile=0.99)
    feats = classes.features
    truth = feats["feature"].isin(list(groups))
    assert (feats["output_predicting"] == truth).all()
    assert (feats["semantic"] == truth).all()
    assert classes.null_rate <= 0.01
    assert set(classes.thresholds["metric"]) == {"topk_z", "levenshtein", "cosine", "concentration"}
    assert classes.thresholds.loc[classes.thresholds.metric == "topk_z", "threshold"].iloc[0] == pytest.approx(
        np.quantile(topk_zscore(out_stats[out_stats["sample"] == "null"]), 0.99))
    assert {"side", "metric", "q", "value"} <= set(classes.null_quantiles.columns)
    metrics = coherence_metrics(out_tok, out_stats, vectors)
    assert len(metrics) == 360 and metrics["concentration"].notna().all()
