"""core.analysis.agreement on cases with a known answer: agreement that must be perfect, and agreement that must be
chance."""

import numpy as np
import pandas as pd
import pytest

from core.analysis.agreement import agreement_summary, feature_agreement, fisher_combined, release_agreement, top_lists

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
    classes = pd.DataFrame(
        {"feature": range(N), "output_predicting": rng.random(N) < 0.3, "topk_z": rng.normal(size=N)}
    )
    effects = pd.DataFrame({"feature": range(N), "output_score": rng.random(N), "effect_size": 0.0, "n_contexts": 8})
    summary = agreement_summary(agree, effects, classes, seed=4).set_index("statistic")
    for stat in ("output_overlap", "input_overlap"):
        assert summary.loc[stat, "value"] == pytest.approx(summary.loc[stat, "control"], abs=0.01)
    assert summary.loc["output_score_auroc_for_output_predicting", "value"] == pytest.approx(0.5, abs=0.1)
    assert abs(summary.loc["spearman_topk_z_output_score", "value"]) < 0.15
    assert (summary["p_value"] > 0.01).all()  # chance-level readings: no test rejects


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


def _sae(rng, related: bool, sae_id: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One SAE's ``agreement_summary`` and ``activation_agreement`` rows: activations that follow the weights
    (the activation lists are the lens lists, the output score tracks the class) or ignore them."""
    lens_out, lens_in = _lists(rng), _lists(rng)
    promotes, fires_on = (lens_out, lens_in) if related else (_lists(rng), _lists(rng))
    labels = rng.random(N) < 0.3
    score = labels + rng.random(N) * 0.5 if related else rng.random(N)
    classes = pd.DataFrame({"feature": range(N), "output_predicting": labels, "topk_z": labels + rng.random(N)})
    effects = pd.DataFrame({"feature": range(N), "output_score": score})
    agree = feature_agreement(lens_out, lens_in, promotes, fires_on, K, seed=int(rng.integers(1 << 30)))
    summary = agreement_summary(agree, effects, classes, seed=int(rng.integers(1 << 30)))
    return summary.assign(sae_id=sae_id), agree.assign(sae_id=sae_id)


@pytest.mark.parametrize("related", [True, False])
def test_release_agreement_is_beyond_chance_only_when_the_activations_follow_the_weights(related):
    rng = np.random.default_rng(8 + related)
    parts = [_sae(rng, related, f"layer_{i}") for i in range(3)]
    pooled = release_agreement("r", pd.concat([s for s, _ in parts]), pd.concat([a for _, a in parts]), seed=9)
    pooled = pooled.set_index("statistic")
    assert set(pooled.index) == {
        "output_overlap",
        "input_overlap",
        "output_score_auroc_for_output_predicting",
        "spearman_topk_z_output_score",
    }
    assert (pooled["saes"] == 3).all() and pooled.loc["output_overlap", "n"] == 3 * N
    if related:
        assert pooled["beyond_chance"].all()
    else:
        assert not pooled["beyond_chance"].any() and (pooled["p_value"] > 0.01).all()


def test_release_agreement_without_a_corpus_is_empty():
    assert release_agreement("r", pd.DataFrame(), pd.DataFrame()).empty


def test_fisher_combined_matches_the_closed_forms():
    assert fisher_combined(np.array([0.3])) == pytest.approx(0.3)
    p1, p2 = 0.04, 0.5  # m = 2: P(X >= x) = p1 p2 (1 - ln(p1 p2))
    assert fisher_combined(np.array([p1, p2])) == pytest.approx(p1 * p2 * (1 - np.log(p1 * p2)))
    assert fisher_combined(np.ones(5)) == pytest.approx(1.0)
