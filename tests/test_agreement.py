"""core.analysis.agreement on cases with a known answer: agreement that must be perfect, and agreement that must be
chance."""

import numpy as np
import pandas as pd
import pytest

from core.analysis.agreement import (
    SEMANTIC,
    activation_coherence,
    agreement_summary,
    feature_agreement,
    fisher_combined,
    release_agreement,
    top_lists,
)

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


def _word_vocabulary(rng, n_clusters: int, size: int, noise_tokens: int, d: int = 32):
    """A vocabulary of ``n_clusters`` word families (``size`` forms each: one stem + suffix, embedding rows close to
    a shared direction) and ``noise_tokens`` unrelated normal tokens, as ``vocabulary_table`` writes it, with its
    rows (vocab, d)."""
    letters = np.array(list("bcdfghjklmnpqrstvwxz"))
    tokens = [f"stem{c:02d}{s:02d}" for c in range(n_clusters) for s in range(size)]
    tokens += ["".join(rng.choice(letters, 7)) + f"{i}" for i in range(noise_tokens)]
    base = rng.normal(size=(n_clusters, d))
    rows = rng.normal(size=(len(tokens), d))
    rows[: n_clusters * size] = np.repeat(base, size, axis=0) + 0.3 * rng.normal(size=(n_clusters * size, d))
    vocabulary = pd.DataFrame({"token_id": range(len(tokens)), "token": tokens, "token_class": "normal"})
    return vocabulary, rows.astype(np.float32)


def _activation_tokens(lists: dict[int, list[int]], side: str) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"side": side, "feature": f, "rank": r, "token_id": t, "value": float(len(ids) - r)}
            for f, ids in lists.items()
            for r, t in enumerate(ids)
        ]
    )


def test_activation_coherence_ranks_a_word_family_above_random_tokens_on_both_sides():
    """Features whose activation lists are one word family (shared stem, nearby vectors) rank above features whose
    lists are random tokens, on both metrics; a list with fewer than k forms has no coherence."""
    rng = np.random.default_rng(11)
    n_clusters, size = 20, 15
    vocabulary, rows = _word_vocabulary(rng, n_clusters, size, noise_tokens=600)
    family = {c: [c * size + s for s in rng.permutation(size)] for c in range(n_clusters)}
    lists = family | {
        n_clusters + i: rng.choice(np.arange(n_clusters * size, len(vocabulary)), 15, replace=False).tolist()
        for i in range(n_clusters)
    }
    lists[2 * n_clusters] = family[0][: K - 1]  # too short for k forms
    tokens = pd.concat([_activation_tokens(lists, "promotes"), _activation_tokens(lists, "fires_on")])
    coherence = activation_coherence(tokens, vocabulary, {"output": rows, "input": rows}, K)
    for side, frame in coherence.groupby("side"):
        frame = frame.set_index("feature")
        coherent, random = frame.loc[: n_clusters - 1], frame.loc[n_clusters : 2 * n_clusters - 1]
        for metric in ("levenshtein", "cosine", "coherence"):
            assert coherent[metric].min() > random[metric].max(), (side, metric)
        assert frame.loc[2 * n_clusters].isna()[["levenshtein", "cosine", "coherence"]].all()


def _semantic_classes(rng, labels: np.ndarray) -> pd.DataFrame:
    scores = labels + rng.random(len(labels))
    return pd.DataFrame(
        {
            "feature": range(len(labels)),
            "output_predicting": labels,
            "topk_z": scores,
            "semantic_output": labels,
            "semantic_input": labels,
            "out_semantic_score": scores,
            "in_semantic_score": scores,
        }
    )


@pytest.mark.parametrize("related", [True, False])
def test_semantic_counterpart_is_called_only_when_the_activation_coherence_follows_the_weight_call(related):
    """The semantic rows of ``agreement_summary``: an activation coherence that follows the weight-based semantic
    call gives AUROC 1 against a 0.5 control; one that ignores it gives chance and no rejection."""
    rng = np.random.default_rng(12 + related)
    labels = rng.random(N) < 0.3
    classes = _semantic_classes(rng, labels)
    coherence = pd.concat(
        [
            pd.DataFrame(
                {"feature": range(N), "side": side, "coherence": labels + rng.random(N) if related else rng.random(N)}
            )
            for side in ("output", "input")
        ]
    )
    effects = pd.DataFrame({"feature": range(N), "output_score": rng.random(N)})
    agree = feature_agreement(_lists(rng), _lists(rng), _lists(rng), _lists(rng), K, seed=14)
    summary = agreement_summary(agree, effects, classes, seed=15, coherence=coherence).set_index("statistic")
    for c in SEMANTIC.values():
        assert summary.loc[c.auroc, "control"] == pytest.approx(0.5, abs=0.05)
        if related:
            assert summary.loc[c.auroc, "value"] == 1.0 and summary.loc[c.auroc, "p_value"] < 0.01
            assert summary.loc[c.spearman, "value"] > 0.5 and summary.loc[c.spearman, "p_value"] < 0.01
        else:
            assert summary.loc[c.auroc, "value"] == pytest.approx(0.5, abs=0.1)
            assert summary.loc[[c.auroc, c.spearman], "p_value"].gt(0.01).all()
