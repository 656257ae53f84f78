"""Unit tests of the semantic tests and the feature classes on small synthetic frames."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.analysis.classify import (
    NULLS,
    c1_sensitivity,
    call_classes,
    classify_features,
    lens_measures,
    output_predicting,
    paper_rule,
)
from core.analysis.semantic import (
    MIN_PASSES,
    Whitening,
    calibrate,
    combine,
    cosine_coherence,
    levenshtein_coherence,
    normalise_token,
    string_permutation_null,
    token_sets,
    whitening,
)

pytestmark = pytest.mark.unit


def test_normalise_token_strips_markers_and_case():
    assert normalise_token("ĠCart") == "cart"
    assert normalise_token("▁Carts ") == "carts"
    assert normalise_token(" ") == ""


def test_levenshtein_coherence_per_k():
    got = levenshtein_coherence(["cart", "carts", "carter"], (2, 3))
    assert got[2] == pytest.approx(0.8)
    assert 0.6 < got[3] < 0.9
    low = levenshtein_coherence(["apple", "zebra", "quiet"], (3,))[3]
    assert 0 <= low < 0.3
    assert np.isnan(levenshtein_coherence(["one"], (2,))[2])  # a set of one form has no coherence


def test_token_sets_skip_non_normal_ids_and_merge_case_space_variants():
    tokens = pd.DataFrame(
        {
            "sample": "feature",
            "feature": 0,
            "side": "top",
            "rank": range(1, 8),
            "token_id": [0, 1, 2, 3, 4, 5, 6],
            "token": ["<unused0>", " the", "The", " THE", "<0xE2>", " cat", " dog"],
            "value": 1.0,
        }
    )
    normal = np.array([False, True, True, True, False, True, True])
    sets = token_sets(tokens, normal, 3)
    assert sets.forms == [["the", "cat", "dog"]]
    assert sets.ids.tolist() == [[1, 5, 6]]
    assert sets.counts(3) == (np.array([2]), np.array([2]))  # <unused0>, <0xE2> skipped; The, THE merged
    assert sets.counts(1)[0].tolist() == [1] and sets.counts(1)[1].tolist() == [0]
    short = token_sets(tokens, normal, 5)
    assert short.ids.tolist() == [[1, 5, 6, -1, -1]]


def test_whitening_removes_the_mean_and_the_dominant_directions():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(4000, 16))
    base[:, 0] *= 10.0  # one dominant direction (variance 100 vs 1)
    vectors = (base + 3.0).astype(np.float32)  # a common mean
    white = whitening(vectors, np.ones(len(vectors), dtype=bool))
    assert white.n_components == 1 and abs(white.components[0, 0]) > 0.99
    out = white.apply(vectors)
    assert np.abs(out.mean(axis=0)).max() < 0.1 and out[:, 0].std() < 0.1
    isotropic = whitening(rng.normal(size=(4000, 16)).astype(np.float32), np.ones(4000, dtype=bool))
    assert isotropic.n_components == 0


def test_string_permutation_null_matches_lengths_and_is_low():
    tokens = pd.DataFrame(
        {
            "sample": "feature",
            "feature": np.repeat([0, 1], 3),
            "side": "top",
            "rank": [1, 2, 3] * 2,
            "token_id": range(6),
            "token": [" cart", " carts", " carter", " a", " bb", " ccc"],
            "value": 1.0,
        }
    )
    sets = token_sets(tokens, np.ones(6, dtype=bool), 3)
    rng = np.random.default_rng(0)
    pool = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), n)) for n in (1, 2, 3, 4, 5) for _ in range(50)]
    null = string_permutation_null(sets, pool, 3, 200)  # no pool form has 6 letters: the nearest length (5) fills in
    assert null.shape == (200,) and np.isfinite(null).all()
    assert np.quantile(null, 0.99) < levenshtein_coherence(["cart", "carts", "carter"], (3,))[3]
    with pytest.raises(ValueError, match="no set of 5 forms"):
        string_permutation_null(sets, pool, 5, 10)


def test_cosine_coherence_leaves_the_first_form_out():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 8)).astype(np.float32)
    ids = rng.integers(0, 50, (7, 4))
    ids[6, 3] = -1
    identity = Whitening(np.zeros(8, dtype=np.float32), np.zeros((0, 8), dtype=np.float32))
    got = cosine_coherence(ids, vectors, identity, (3, 4), chunk=3)
    for r in range(6):
        v = vectors[ids[r, 1:]] / np.linalg.norm(vectors[ids[r, 1:]], axis=1, keepdims=True)
        g = v @ v.T
        assert got[4][r] == pytest.approx((g.sum() - np.trace(g)) / 6, abs=1e-5)
    assert np.isnan(got[4][6]) and np.isfinite(got[3][6])


def synthetic_side(n_null=400, n_coherent=30, n_random=70, seed=0):
    """Metric rows: null and random features ~ N(0, 1) per metric; coherent features shifted by 5."""
    rng = np.random.default_rng(seed)
    rows = []
    for sample, n, shift in (("null", n_null, 0.0), ("feature", n_coherent, 5.0), ("feature", n_random, 0.0)):
        base = len([r for r in rows if r["sample"] == sample])
        for i in range(n):
            rows.append(
                {
                    "sample": sample,
                    "feature": base + i,
                    "levenshtein": rng.normal(shift),
                    "cosine": rng.normal(shift),
                    "concentration": rng.normal(shift),
                }
            )
    return pd.DataFrame(rows)


def test_calibration_is_the_null_quantile_and_rule_is_majority():
    metrics = synthetic_side()
    null = metrics[metrics["sample"] == "null"]
    cal = calibrate(null, quantile=0.95)
    classified = combine(metrics, cal)
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
    null = pd.DataFrame(
        {
            "sample": "null",
            "feature": range(100),
            "levenshtein": np.linspace(0, 1, 100),
            "cosine": np.linspace(0, 1, 100),
            "concentration": np.linspace(0, 1, 100),
        }
    )
    cal = calibrate(null, 0.99)
    rows = pd.DataFrame(
        {
            "sample": "feature",
            "feature": [0, 1, 2],
            "levenshtein": [5.0, 5.0, 5.0],
            "cosine": [0.5, 5.0, 5.0],
            "concentration": [0.5, 0.5, 5.0],
        }
    )
    out = combine(rows, cal)
    assert out["n_passes"].tolist() == [1, 2, 3]
    assert out["semantic"].tolist() == [False, True, True]


SAMPLES = {"feature": 60, "control": 60, "null": 300, "matched_null": 300}


def lens_tables(vocab: list[str], groups: dict[int, list[int]], seed: int, n_candidates: int = 24):
    """Synthetic ``*_lens_tokens`` / ``*_lens_stats`` rows for every sample: features in ``groups`` get their
    group's tokens first (values 6) and a peaked softmax; every other row random tokens (values 3)."""
    rng = np.random.default_rng(seed)
    tok, stats = [], []
    for sample, n in SAMPLES.items():
        for f in range(n):
            coherent = sample == "feature" and f in groups
            head = groups[f] if coherent else []
            rest = [t for t in rng.permutation(len(vocab)).tolist() if t not in head][: n_candidates - len(head)]
            for rank, t in enumerate(head + rest, 1):
                value = (6.0 if rank <= len(head) else 3.0) + rng.normal(0, 0.1)
                tok.append(
                    {
                        "sample": sample,
                        "feature": f,
                        "side": "top",
                        "rank": rank,
                        "token_id": t,
                        "token": vocab[t],
                        "value": value,
                    }
                )
            stats.append(
                {
                    "sample": sample,
                    "feature": f,
                    "mean": 0.0,
                    "std": 1.0,
                    "top1_cosine": 0.1,
                    "softmax_entropy": (2.0 if coherent else 8.0) + rng.normal(0, 0.1),
                }
            )
    return pd.DataFrame(tok), pd.DataFrame(stats)


def synthetic_release():
    rng = np.random.default_rng(1)
    stems = ["cart", "bird", "lamp", "rock", "moon", "tree"]
    vocab, vec_rows, groups_tokens = [], [], {}
    centres = rng.normal(size=(len(stems), 16))
    for g, stem in enumerate(stems):
        ids = []
        for suffix in ("", "s", "er", "ing", "ed", "ers", "ly", "ion", "ings", "y", "ish", "less"):
            ids.append(len(vocab))
            vocab.append(" " + stem + suffix)
            vec_rows.append(centres[g] + 0.3 * rng.normal(size=16))
        groups_tokens[g] = ids
    for _ in range(400):
        vocab.append("".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 5)))
        vec_rows.append(rng.normal(size=16))
    vectors = np.asarray(vec_rows, dtype=np.float32)
    groups = {f: groups_tokens[f % len(stems)] for f in range(0, 60, 3)}  # 20 of 60 features coherent
    out_tok, out_stats = lens_tables(vocab, groups, seed=2)
    in_tok, in_stats = lens_tables(vocab, groups, seed=3)
    lens = {
        "output_lens_tokens": out_tok,
        "output_lens_stats": out_stats,
        "input_lens_tokens": in_tok,
        "input_lens_stats": in_stats,
    }
    return lens, vectors, groups


def test_classify_features_end_to_end_on_synthetic_lens():
    lens, vectors, groups = synthetic_release()
    normal = np.ones(len(vectors), dtype=bool)
    classes = classify_features(lens, normal, vectors, vectors, quantile=0.99, k=10)
    feats = classes.features
    truth = feats["feature"].isin(list(groups))
    assert (feats["output_predicting"] == truth).all()
    assert (feats["semantic"] == truth).all()
    assert classes.null_rate("matched") <= 0.01 and classes.null_rate("isotropic") <= 0.02
    assert set(classes.thresholds["metric"]) == {"topk_z", "levenshtein", "cosine", "concentration"}
    assert set(classes.thresholds["null"]) == {*NULLS, "string_permutation"}
    assert (classes.thresholds["rule"] == "null_calibrated").all() and len(classes.thresholds) == 2 * 7 + 2
    strings = classes.thresholds[classes.thresholds["null"] == "string_permutation"]
    assert set(strings["metric"]) == {"levenshtein"} and set(strings["side"]) == {"output", "input"}
    assert (classes.rows["null"] == "matched").all() and (classes.rows["k"] == 10).all()
    assert {"side", "metric", "q", "value", "null"} <= set(classes.null_quantiles.columns)
    assert not classes.rows["token_identity"].any()


def test_sensitivity_table_and_the_paper_rule_true_by_construction():
    lens, vectors, _ = synthetic_release()
    m = lens_measures(lens, np.ones(len(vectors), dtype=bool), vectors, vectors)
    paper = paper_rule(m, 10)
    for sample in ("feature", "control", "null"):
        assert paper[(m.keys["sample"] == sample).to_numpy()].mean() == pytest.approx(0.25, abs=0.02)
    table = c1_sensitivity(m)
    assert set(table["rule"]) == {"null_calibrated", "paper_p75"} and set(table["k"]) == {5, 10, 20}
    for null in NULLS:  # the grid's fast path is THE classes
        assert (output_predicting(m, null, 0.95, 5) == call_classes(m, null, 0.95, 5).rows["output_predicting"]).all()
    feats = table[(table["sample"] == "feature") & (table["rule"] == "null_calibrated")]
    strict = feats[feats["quantile"] >= 0.99]
    assert np.allclose(strict["fraction"], 20 / 60)  # every coherent feature, no random one, at P99 and above
    assert ((feats["fraction"] >= 20 / 60) & (feats["fraction"] <= 23 / 60)).all()  # P90: a few random ones too
    ctrl = table[(table["sample"] == "control") & (table["rule"] == "null_calibrated")]
    assert (ctrl["fraction"] <= 0.05).all()


def test_unknown_null_is_an_error():
    lens, vectors, _ = synthetic_release()
    with pytest.raises(ValueError, match="unknown null"):
        classify_features(lens, np.ones(len(vectors), dtype=bool), vectors, vectors, null="uniform")
