"""core.agreement on cases with a known answer: agreement that must be perfect, and agreement that must be chance."""

import numpy as np
import pandas as pd
import pytest

from core.agreement import agreement_summary, feature_agreement, top_lists

pytestmark = pytest.mark.unit

K, N, VOCAB = 10, 300, 5000


def _lists(rng, n=N):
    return {f: rng.choice(VOCAB, K, replace=False).tolist() for f in range(n)}


def test_identical_readings_agree_fully_and_the_shuffle_is_at_chance():
    lens = _lists(np.random.default_rng(0))
    agree = feature_agreement(lens, lens, lens, lens, K, seed=1)
    assert (agree["output_overlap"] == 1).all() and (agree["input_overlap"] == 1).all()
    assert agree["output_overlap_shuffled"].mean() < 0.02  # K / VOCAB = 0.002 expected, plus self-matches


def test_unrelated_readings_are_not_called_agreement():
    rng = np.random.default_rng(2)
    agree = feature_agreement(_lists(rng), _lists(rng), _lists(rng), _lists(rng), K, seed=3)
    classes = pd.DataFrame({"feature": range(N), "output_predicting": rng.random(N) < 0.3, "topk_z": rng.normal(size=N)})
    effects = pd.DataFrame({"feature": range(N), "output_score": rng.random(N), "effect_size": 0.0, "n_contexts": 8})
    summary = agreement_summary(agree, effects, classes, seed=4).set_index("statistic")
    for stat in ("output_overlap", "input_overlap"):
        assert summary.loc[stat, "value"] == pytest.approx(summary.loc[stat, "control"], abs=0.01)
    assert summary.loc["output_score_auroc_for_output_predicting", "value"] == pytest.approx(0.5, abs=0.1)
    assert abs(summary.loc["spearman_topk_z_output_score", "value"]) < 0.15


def test_a_score_that_tracks_the_class_gives_auroc_one_against_a_half_control():
    rng = np.random.default_rng(5)
    labels = rng.random(N) < 0.3
    classes = pd.DataFrame({"feature": range(N), "output_predicting": labels, "topk_z": labels + rng.random(N) * 0.1})
    effects = pd.DataFrame({"feature": range(N), "output_score": labels * 1.0 + rng.random(N) * 0.5})
    agree = feature_agreement(_lists(rng), _lists(rng), _lists(rng), _lists(rng), K, seed=6)
    summary = agreement_summary(agree, effects, classes, seed=7).set_index("statistic")
    assert summary.loc["output_score_auroc_for_output_predicting", "value"] == 1.0
    assert summary.loc["output_score_auroc_for_output_predicting", "control"] == pytest.approx(0.5, abs=0.05)


def test_top_lists_keeps_rank_order_and_k():
    frame = pd.DataFrame({"feature": [0, 0, 0, 1], "rank": [2, 0, 1, 0], "token_id": [30, 10, 20, 5]})
    assert top_lists(frame, 2) == {0: [10, 20], 1: [5]}
