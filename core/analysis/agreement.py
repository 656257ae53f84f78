"""How far the weight-based reading of a feature agrees with what it does on text (``core.analysis.activations``).

Per feature (``feature_agreement``):

* ``output_overlap = |lens_out(f) ∩ promotes(f)| / k``: the output lens' top-k tokens vs the k tokens whose
  next-token log-probability falls most when the feature is removed where it fires;
* ``input_overlap = |lens_in(f) ∩ fires_on(f)| / k``: the input lens' top-k tokens vs the k tokens on which the
  feature's mean activation is highest;
* each beside its shuffled control: the same overlap with the lens list of another feature (one seeded
  permutation of the measured features) — chance agreement for features of this SAE and this vocabulary.

Per SAE (``agreement_summary``), one row per statistic: ``value`` for the features, ``control`` under the shuffle
(the mean over ``n_shuffles`` permutations), ``p_value`` (one-sided, value above chance) and ``n``: mean overlaps
(p: sign flips of the per-feature differences overlap − shuffled overlap, ``core.analysis.statistics.sign_flip_test``);
the AUROC of the activation-based ``output_score`` for the weight-based ``output_predicting`` class
(``core.analysis.statistics.auroc``; control: permuted labels, 0.5 in expectation); Spearman's rank correlation of the
weight score ``topk_z`` with ``output_score`` (both p: ``(1 + #{null ≥ value}) / (1 + n_shuffles)``); and the
attention counterpart of the decoder phase: the AUROC of ``attention_log_ratio`` (``core.analysis.activations.
attention_received``: attention the next block pays to the positions where the feature fires) for the weight-based
``participates`` call of phase ``decoder_unembedding`` (``feature_participation``), and Spearman's correlation of
its ``mean_score`` with ``attention_log_ratio``; and the semantic counterpart of each side
(``activation_coherence``): the AUROC of the coherence of the feature's activation list (``promotes`` for the output
side, ``fires_on`` for the input side) for the weight-based ``semantic_{side}`` call, and Spearman's correlation of
the weight-based ``{out,in}_semantic_score`` with it.

Activation coherence (``activation_coherence``) takes the weight side's own set and metrics
(``core.analysis.semantic``) to the activation lists: the first k normal forms of the list (the lists are kept
``LIST_LENGTH`` long, so hygiene and merged variants leave room for k forms), their mean pairwise Levenshtein
similarity and their mean pairwise whitened cosine (unembedding rows for ``promotes``, embedding rows for
``fires_on``); ``coherence`` is the mean of the two metrics' percentile ranks among the SAE's measured features
(NaN where the list holds fewer than k forms). The lens metric ``concentration`` has no activation counterpart (it
needs the direction's values over the whole vocabulary), so the activation side has no threshold and no class of
its own: it is compared with the weight side by rank statistics only.

Per release (``release_agreement``, what the report shows), pooled over its SAEs: the overlaps over every
measured feature (sign flips again), the AUROC and Spearman rows as ``n``-weighted means with the SAEs' p-values
combined by Fisher's method; ``beyond_chance`` = ``p_value < ALPHA``. The statement it tests: the weight-based
reading agrees with the activations more than another feature's reading does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.analysis.semantic import CANDIDATES, cosine_coherence, levenshtein_coherence, token_sets, whitening
from core.analysis.statistics import auroc, sign_flip_test
from core.analysis.verdicts import ALPHA
from core.weights.vocab import normal_tokens

__all__ = [
    "activation_coherence",
    "agreement_summary",
    "feature_agreement",
    "release_agreement",
    "top_lists",
]
OVERLAPS = ("output_overlap", "input_overlap")
SEMANTIC_LISTS = {"output": "promotes", "input": "fires_on"}  # side -> the activation list its lens set meets
LIST_LENGTH = CANDIDATES  # tokens kept per activation list: room for k forms after hygiene, as on the lens side


@dataclass(frozen=True)
class Comparison:
    """A weight-based class and score of each feature against an activation-based score: the AUROC of ``activation``
    for ``weight_class`` (row ``auroc``) and Spearman's correlation of ``weight_score`` with it (row ``spearman``)."""

    activation: str
    weight_class: str
    weight_score: str
    auroc: str
    spearman: str


OUTPUT = Comparison(
    "output_score",
    "output_predicting",
    "topk_z",
    "output_score_auroc_for_output_predicting",
    "spearman_topk_z_output_score",
)
ATTENTION = Comparison(
    "attention_log_ratio",
    "participates",
    "mean_score",
    "attention_auroc_for_decoder_participation",
    "spearman_decoder_participation_attention",
)
SEMANTIC = {
    side: Comparison(
        f"{side}_coherence",
        f"semantic_{side}",
        f"{prefix}_semantic_score",
        f"{side}_coherence_auroc_for_semantic_{side}",
        f"spearman_{prefix}_semantic_score_{side}_coherence",
    )
    for side, prefix in (("output", "out"), ("input", "in"))
}


def top_lists(frame: pd.DataFrame, k: int, by: str = "rank") -> dict[int, list[int]]:
    """feature -> its first ``k`` token ids in ``by`` order, from a long table ``feature, token_id, <by>``."""
    frame = frame.sort_values(["feature", by]).groupby("feature").head(k)
    return {int(f): g["token_id"].astype(int).tolist() for f, g in frame.groupby("feature")}


def _overlap(a: list[int], b: list[int], k: int) -> float:
    return len(set(a[:k]) & set(b[:k])) / k


def feature_agreement(
    lens_out: dict[int, list[int]],
    lens_in: dict[int, list[int]],
    promotes: dict[int, list[int]],
    fires_on: dict[int, list[int]],
    k: int,
    seed: int,
) -> pd.DataFrame:
    """``feature, output_overlap, output_overlap_shuffled, input_overlap, input_overlap_shuffled`` for every
    feature with both sides measured (NaN where one side is missing)."""
    rng = np.random.default_rng(seed)
    features = sorted(set(promotes) | set(fires_on))
    out_perm = dict(zip(features, rng.permutation(features)))
    in_perm = dict(zip(features, rng.permutation(features)))
    rows = []
    for f in features:
        row: dict[str, float] = {"feature": f}
        for side, lens, act, perm in (("output", lens_out, promotes, out_perm), ("input", lens_in, fires_on, in_perm)):
            have = f in act and f in lens and perm[f] in lens
            row[f"{side}_overlap"] = _overlap(lens[f], act[f], k) if have else np.nan
            row[f"{side}_overlap_shuffled"] = _overlap(lens[perm[f]], act[f], k) if have else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def activation_coherence(
    tokens: pd.DataFrame, vocabulary: pd.DataFrame, vectors: dict[str, np.ndarray], k: int
) -> pd.DataFrame:
    """``feature, side, levenshtein, cosine, coherence`` of each feature's activation lists (module docstring):
    ``tokens``: the stage's ``activation_tokens`` (``side`` promotes | fires_on, ``feature, rank, token_id, value``);
    ``vocabulary``: ``core.weights.vocab.vocabulary_table``; ``vectors``: ``output`` -> unembedding, ``input`` ->
    embedding rows, (vocab, d_model), as the lens side's classes read them."""
    normal = normal_tokens(vocabulary)  # checks that every id 0..n-1 is there once
    strings = vocabulary.sort_values("token_id")["token"].to_numpy()
    parts = []
    for side, listed in SEMANTIC_LISTS.items():
        rows = tokens[tokens["side"] == listed]
        sets = token_sets(
            rows.assign(sample="feature", side="top", token=strings[rows["token_id"].to_numpy()]), normal, k
        )
        white = whitening(vectors[side], normal)
        part = sets.keys[["feature"]].assign(
            side=side,
            levenshtein=[levenshtein_coherence(forms, (k,))[k] for forms in sets.forms],
            cosine=cosine_coherence(sets.ids, vectors[side], white, (k,))[k],
        )
        part["coherence"] = part[["levenshtein", "cosine"]].rank(pct=True).mean(axis=1, skipna=False)
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    return float(np.corrcoef(ra, rb)[0, 1])


def agreement_summary(
    agree: pd.DataFrame,
    effects: pd.DataFrame,
    classes: pd.DataFrame,
    *,
    seed: int,
    n_shuffles: int = 200,
    attention: pd.DataFrame | None = None,
    participation: pd.DataFrame | None = None,
    coherence: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """``statistic, value, control, p_value, n`` for one SAE (see module docstring). ``classes``: ``feature,
    output_predicting, topk_z`` (``feature_classes``; with ``coherence`` also ``semantic_{output,input}`` and
    ``{out,in}_semantic_score``); ``effects``: ``core.analysis.activations.ablation``'s table; ``attention``:
    ``core.analysis.activations.attention_received``'s; ``participation``: ``feature, mean_score, participates`` of
    the decoder phase (both optional: no attention rows without them); ``coherence``: ``activation_coherence``'s
    table (optional: no semantic rows without it)."""
    rng = np.random.default_rng(seed)
    compared = [(effects, classes, OUTPUT)]
    if attention is not None and participation is not None:
        compared.append((attention, participation, ATTENTION))
    if coherence is not None:
        for side, c in SEMANTIC.items():
            scores = coherence.loc[coherence["side"] == side, ["feature", "coherence"]]
            compared.append((scores.rename(columns={"coherence": c.activation}), classes, c))
    rows = [_overlap_row(agree, statistic, seed) for statistic in OVERLAPS]
    for activations, weights, c in compared:
        frame = activations[["feature", c.activation]].merge(weights[["feature", c.weight_class, c.weight_score]])
        rows += _score_rows(frame, c, rng, n_shuffles)
    return pd.DataFrame(rows, columns=["statistic", "value", "control", "p_value", "n"])


def _score_rows(frame: pd.DataFrame, c: Comparison, rng: np.random.Generator, n_shuffles: int) -> list[dict]:
    """The AUROC and Spearman rows of comparison ``c`` on ``frame``, each against ``n_shuffles`` permutations (rows
    only where measurable: both classes present, > 2 features)."""
    frame = frame.dropna(subset=[c.activation, c.weight_score])
    score, labels = frame[c.activation].to_numpy(), frame[c.weight_class].to_numpy(bool)
    rows = []
    if 0 < labels.sum() < len(labels):
        rows.append(
            _permutation_row(
                c.auroc,
                auroc(score, labels),
                [auroc(score, rng.permutation(labels)) for _ in range(n_shuffles)],
                len(frame),
            )
        )
    if len(frame) > 2:
        weights = frame[c.weight_score].to_numpy()
        rows.append(
            _permutation_row(
                c.spearman,
                _spearman(weights, score),
                [_spearman(rng.permutation(weights), score) for _ in range(n_shuffles)],
                len(frame),
            )
        )
    return rows


def _overlap_row(agree: pd.DataFrame, statistic: str, seed: int) -> dict:
    """Mean overlap and its shuffled control over the features with both sides measured; p by sign flips of
    the per-feature differences."""
    pairs = agree[[statistic, f"{statistic}_shuffled"]].dropna().to_numpy()
    p = sign_flip_test(pairs[:, 0] - pairs[:, 1], seed=seed)[0] if len(pairs) else float("nan")
    mean = pairs.mean(0) if len(pairs) else np.full(2, np.nan)
    return {"statistic": statistic, "value": float(mean[0]), "control": float(mean[1]), "p_value": p, "n": len(pairs)}


def _permutation_row(statistic: str, value: float, null: list[float], n: int) -> dict:
    null_values = np.asarray(null)
    return {
        "statistic": statistic,
        "value": value,
        "control": float(null_values.mean()),
        "p_value": float((1 + np.sum(null_values >= value)) / (1 + len(null_values))),
        "n": n,
    }


def fisher_combined(p_values: np.ndarray) -> float:
    """Fisher's method: ``X = −2 Σ ln p`` is χ² with 2m degrees of freedom under H0 for m independent tests;
    its survival function for even degrees of freedom is ``e^{−X/2} Σ_{i<m} (X/2)^i / i!``."""
    p_values = np.clip(np.asarray(p_values, dtype=np.float64), 1e-300, 1.0)
    half = -np.log(p_values).sum()
    terms = np.cumprod(np.r_[1.0, np.full(len(p_values) - 1, half) / np.arange(1, len(p_values))])
    return float(min(1.0, np.exp(-half) * terms.sum()))


def release_agreement(release: str, summary: pd.DataFrame, per_feature: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """``release, statistic, value, control, p_value, n, saes, beyond_chance`` of one release (module docstring)
    from its SAEs' ``agreement_summary`` and ``activation_agreement`` rows (empty in, empty out)."""
    if summary.empty:
        return pd.DataFrame()
    rows = [
        _overlap_row(per_feature, statistic, seed) | {"saes": int(per_feature["sae_id"].nunique())}
        for statistic in OVERLAPS
    ]
    for statistic, group in summary[~summary["statistic"].isin(OVERLAPS)].groupby("statistic", sort=True):
        weights = group["n"].to_numpy(np.float64)
        rows.append(
            {
                "statistic": statistic,
                "value": float(np.average(group["value"], weights=weights)),
                "control": float(np.average(group["control"], weights=weights)),
                "p_value": fisher_combined(group["p_value"].to_numpy()),
                "n": int(weights.sum()),
                "saes": len(group),
            }
        )
    out = pd.DataFrame(rows)
    out.insert(0, "release", release)
    return out.assign(beyond_chance=(out["p_value"] < ALPHA) & (out["value"] > out["control"]))


def agreement_stage(
    model,
    sae,
    layer: int,
    chunks,
    lens_tokens: dict[str, pd.DataFrame],
    classes: pd.DataFrame,
    participation: pd.DataFrame,
    vocabulary: pd.DataFrame,
    vectors: dict[str, np.ndarray],
    *,
    k: int,
    seed: int,
    n_contexts: int = 8,
) -> dict[str, pd.DataFrame]:
    """The activation-agreement stage of one SAE: ``core.analysis.activations`` on the corpus ``chunks`` (n, context),
    compared with the stored lens tables (``lens_tokens``: ``output`` / ``input`` -> the ``*_lens_tokens``
    table) and ``feature_classes``. The input side ranges over the tokens the corpus holds at least ``MIN_COUNT``
    times: an input-lens token the text never shows (a rare byte piece with a large embedding) cannot be matched
    by any activation, so the input lens list holds its best *observable* tokens. The output side needs no such
    filter: removing a feature changes the probability of every token, seen or not. ``participation``: the SAE's
    ``feature_participation`` table (its feature rows of the decoder phase are compared with
    ``attention_received``; the model must return attention probabilities). ``vocabulary`` and ``vectors``: as
    ``activation_coherence`` reads them. Tables ``activation_features`` (``firing`` + ``ablation`` +
    ``attention_received`` per feature, and the ``activation_coherence`` columns ``{side}_levenshtein``,
    ``{side}_cosine``, ``{side}_coherence``), ``activation_tokens`` (``side`` fires_on | promotes, ``feature, rank,
    token_id, value``: ``LIST_LENGTH`` per list; the overlaps read the first k), ``activation_agreement``
    (``feature_agreement``) and ``agreement_summary``."""
    import torch

    from core.analysis.activations import MIN_COUNT, ablation, attention_received, firing

    seen = torch.bincount(chunks.reshape(-1).cpu(), minlength=model.config.vocab_size) >= MIN_COUNT
    observable = set(torch.nonzero(seen).flatten().tolist())

    def lens(table: pd.DataFrame, tokens: set[int] | None = None) -> dict[int, list[int]]:
        table = table[(table["sample"] == "feature") & (table["side"] == "top")]
        return top_lists(table if tokens is None else table[table["token_id"].isin(tokens)], k)

    lens_out, lens_in = lens(lens_tokens["output"]), lens(lens_tokens["input"], observable)
    fired = firing(model, sae, layer, chunks, n_contexts=n_contexts, k=LIST_LENGTH, min_count=MIN_COUNT)
    effects, promotes = ablation(model, sae, layer, chunks, fired.contexts, lens_out, k=LIST_LENGTH)
    tokens = pd.concat(
        [
            fired.fires_on.rename(columns={"mean_activation": "value"})
            .drop(columns="occurrences")
            .assign(side="fires_on"),
            promotes.rename(columns={"delta": "value"}).assign(side="promotes"),
        ],
        ignore_index=True,
    )[["side", "feature", "rank", "token_id", "value"]]
    agree = feature_agreement(lens_out, lens_in, top_lists(promotes, k), top_lists(fired.fires_on, k), k, seed)
    attention = attention_received(model, sae, layer, chunks)
    decoder = participation[(participation["sample"] == "feature") & (participation["phase"] == "decoder_unembedding")]
    coherence = activation_coherence(tokens, vocabulary, vectors, k)
    by_side = coherence.pivot(index="feature", columns="side", values=["levenshtein", "cosine", "coherence"])
    by_side.columns = [f"{side}_{metric}" for metric, side in by_side.columns]
    features = (
        fired.features.merge(effects.drop(columns="n_contexts"), on="feature", how="left")
        .merge(attention, on="feature", how="left")
        .merge(by_side.reset_index(), on="feature", how="left")
    )
    summary = agreement_summary(
        agree, effects, classes, seed=seed, attention=attention, participation=decoder, coherence=coherence
    )
    return {
        "activation_features": features,
        "activation_tokens": tokens,
        "activation_agreement": agree,
        "agreement_summary": summary,
    }
