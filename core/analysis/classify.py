"""Feature classes from the vocabulary lenses: heavy-tailed, semantic (per side), output-predicting, token identity.

1. Heavy-tailed output lens. Statistic (per direction, decoder–unembedding lens): the top-k z-score
   ``z = (mean of the k largest logits − mean logit) / std of the logits`` over the whole vocabulary (the
   weight-only analogue of Gurnee et al.'s prediction-neuron kurtosis criterion).
2. Semantic, per side (``core.analysis.semantic``): coherence of the top-k normal token forms by Levenshtein, whitened
   embedding cosine and concentration, each at its null quantile; majority rule.
3. **Output-predicting** (claim C1) = heavy-tailed AND semantic on the output side.
4. **Token identity** (the tied-embedding confound the paper names: a current-token feature whose decoder is
   ≈ ``W_E[t]`` looks output-predicting): the output and input sets share at least half their forms (Jaccard
   ≥ ``TOKEN_IDENTITY_JACCARD``) AND the decoder's nearest unembedding row explains most of it (``top1_share``
   = cos² between the lens's left operand and ``W_U`` of the top token ≥ ``TOKEN_IDENTITY_SHARE``). C1 is
   reported with and without these features.

Two rules (column ``rule``):
- ``null_calibrated`` (default): every threshold is the ``quantile`` (P99) of the same statistic over null
  directions through the same lens of the same SAE. Two nulls (column ``null``): ``matched`` (default) —
  Gaussian directions with the SAE's own second moments (``core.lens.control.matched_null``), so anisotropy the
  SAE's directions share does not pass for a feature property; ``isotropic`` — uniform unit directions, kept
  for the record. Beside them, for the Levenshtein test only, a ``string_permutation`` null (random sets of k
  normal forms with the string lengths of the SAE's own sets: ``core.analysis.semantic.string_permutation_null``),
  recorded in the thresholds so the string metric's calibration can be read without any embedding. The null rows are
  classified by the same rule, so a null's ``null_rate`` is the calibrated
  false-positive rate (in-sample for the null that calibrated it, out-of-sample for the other).
- ``paper_p75``: heavy-tailed = top-k z above the P75 *of the sample's own directions* (as the paper's
  summaries describe the rule). A quarter of the directions pass it by construction, whatever they are —
  shown beside the calibrated number so a reader can see the difference, never used for a verdict.

``c1_sensitivity`` gives the output-predicting fraction of features and control under every rule, null,
quantile of ``SENSITIVITY_QUANTILES`` and k of ``core.analysis.semantic.K_GRID``, with and without token identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.analysis.semantic import (
    CANDIDATES,
    K_GRID,
    METRICS,
    Calibration,
    TokenSets,
    calibrate,
    coherence_metrics,
    combine,
    normalise_token,
    semantic_rule,
    string_permutation_null,
    token_sets,
    whitening,
)
from core.analysis.statistics import DEFAULT_QUANTILE

NULLS = {"matched": "matched_null", "isotropic": "null"}  # null name -> the lens sample holding its directions
DEFAULT_NULL = "matched"
RULES = ("null_calibrated", "paper_p75")
PAPER_QUANTILE = 0.75
SENSITIVITY_QUANTILES = (0.9, 0.95, 0.99, 0.995, 0.999)
TOKEN_IDENTITY_JACCARD = 0.5
TOKEN_IDENTITY_SHARE = 0.5
STRING_NULL_SIZE = 1000  # random sets of the string-permutation null
SIDES = {"output": "out", "input": "in"}
CALLED_SAMPLES = ("feature", "control")  # the samples C1 is reported for


def _aligned(stats: pd.DataFrame, keys: pd.DataFrame, column: str) -> np.ndarray:
    return stats.set_index(["sample", "feature"])[column].reindex(pd.MultiIndex.from_frame(keys)).to_numpy()


def topk_zscores(
    tokens: pd.DataFrame, stats: pd.DataFrame, keys: pd.DataFrame, ks: tuple[int, ...]
) -> dict[int, np.ndarray]:
    """Per k: ``(mean of the k largest values − mean) / std`` per row of ``keys`` (values from the ``side ==
    'top'`` rows of a lens tokens table, mean / std from its stats table)."""
    top = tokens[tokens["side"] == "top"]
    mean, std = _aligned(stats, keys, "mean"), _aligned(stats, keys, "std")
    index = pd.MultiIndex.from_frame(keys)
    out = {}
    for k in ks:
        top_mean = top[top["rank"] <= k].groupby(["sample", "feature"])["value"].mean().reindex(index).to_numpy()
        out[k] = (top_mean - mean) / std
    return out


@dataclass(frozen=True)
class LensMeasures:
    """Every statistic the classes are called from, for every k of ``ks``, aligned with ``keys``."""

    keys: pd.DataFrame  # sample, feature
    ks: tuple[int, ...]
    topk_z: dict[int, np.ndarray]
    sides: dict[str, dict[int, pd.DataFrame]]  # side -> k -> core.analysis.semantic.coherence_metrics frame
    sets: dict[str, TokenSets]
    string_null: dict[str, np.ndarray]  # side -> Levenshtein of random sets with matched lengths (default k)
    top1_share: np.ndarray  # output lens: cos² of the left operand with its top token's unembedding row
    whitening_components: dict[str, int]


def lens_measures(
    lens: dict[str, pd.DataFrame],
    normal: np.ndarray,
    unembedding: np.ndarray,
    embedding: np.ndarray,
    ks: tuple[int, ...] = K_GRID,
    k: int = 10,
) -> LensMeasures:
    """The statistics of one SAE's lens tables (``core.stages.lens_stage``); ``normal``: per token id, whether it
    is a normal token (``core.weights.vocab``); the string-permutation null at set size ``k``."""
    sides, sets, components, string_null = {}, {}, {}, {}
    keys = None
    topk_z: dict[int, np.ndarray] = {}
    for side, vectors in (("output", unembedding), ("input", embedding)):
        tokens, stats = lens[f"{side}_lens_tokens"], lens[f"{side}_lens_stats"]
        sets[side] = token_sets(tokens, normal, max(ks))
        keys = sets[side].keys
        if side == "output":
            topk_z = topk_zscores(tokens, stats, keys, ks)
        white = whitening(vectors, normal)
        components[side] = white.n_components
        sides[side] = coherence_metrics(
            sets[side], _aligned(stats, keys, "mean"), _aligned(stats, keys, "std"), vectors, white, ks
        )
        forms = _normal_forms(tokens, normal)
        string_null[side] = string_permutation_null(sets[side], forms, k, STRING_NULL_SIZE)
    assert keys is not None and keys.equals(sets["output"].keys), "output and input lens rows differ"
    share = _aligned(lens["output_lens_stats"], keys, "top1_cosine") ** 2
    return LensMeasures(keys, ks, topk_z, sides, sets, string_null, share, components)


def _normal_forms(tokens: pd.DataFrame, normal: np.ndarray) -> list[str]:
    """The distinct normal forms of the normal tokens a lens table shows (its candidates: the forms a top set can
    hold), sorted."""
    ids = tokens["token_id"].to_numpy()
    shown = tokens.loc[normal[ids], "token"].unique()
    return sorted({normalise_token(t) for t in shown} - {""})


def _jaccard(a: list[str], b: list[str]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 0.0


def token_identity(m: LensMeasures, k: int) -> pd.DataFrame:
    """``token_jaccard`` (output vs input forms, first k each), ``top1_share`` and ``token_identity``."""
    jac = np.array([_jaccard(o[:k], i[:k]) for o, i in zip(m.sets["output"].forms, m.sets["input"].forms, strict=True)])
    return m.keys.assign(
        token_jaccard=jac,
        top1_share=m.top1_share,
        token_identity=(jac >= TOKEN_IDENTITY_JACCARD) & (m.top1_share >= TOKEN_IDENTITY_SHARE),
    )


@dataclass(frozen=True)
class Call:
    """Classes of every row under one null, quantile and k, with the thresholds used."""

    rows: pd.DataFrame
    thresholds: pd.DataFrame  # side, metric, threshold, null_median, quantile, null_size
    null_quantiles: pd.DataFrame  # side, metric, q, value


def _side_columns(frame: pd.DataFrame, side: str) -> pd.DataFrame:
    prefix = SIDES[side]
    keep = {m: f"{prefix}_{m}" for m in (*METRICS, "n_excluded", "n_collapsed")} | {
        "n_passes": f"{prefix}_n_passes",
        "semantic_score": f"{prefix}_semantic_score",
        "semantic": f"semantic_{side}",
    }
    return frame[list(keep)].rename(columns=keep)


def call_classes(m: LensMeasures, null: str, quantile: float, k: int) -> Call:
    """THE CLASSES (``null_calibrated`` rule) of every row, calibrated on the rows of null ``null``."""
    if null not in NULLS:
        raise ValueError(f"unknown null {null!r}; known: {', '.join(NULLS)}")
    on_null = (m.keys["sample"] == NULLS[null]).to_numpy()
    if not on_null.any():
        raise ValueError(f"no {NULLS[null]!r} rows in the lens tables: the {null} null cannot calibrate")
    z = m.topk_z[k]
    z_cal = calibrate(pd.DataFrame({"topk_z": z[on_null]}), quantile, ("topk_z",))
    rows = m.keys.assign(topk_z=z, heavy_tailed=z > z_cal.thresholds["topk_z"])
    thresholds, null_q = [z_cal.as_frame().assign(side="output")], [z_cal.null_quantiles.assign(side="output")]
    for side, per_k in m.sides.items():
        metrics = per_k[k]
        cal: Calibration = calibrate(metrics[on_null], quantile)
        rows = pd.concat([rows, _side_columns(combine(metrics, cal), side)], axis=1)
        thresholds.append(cal.as_frame().assign(side=side))
        null_q.append(cal.null_quantiles.assign(side=side))
    rows["semantic"] = rows["semantic_output"] | rows["semantic_input"]
    rows["semantic_score"] = np.maximum(rows["out_semantic_score"], rows["in_semantic_score"])
    rows["output_predicting"] = rows["heavy_tailed"] & rows["semantic_output"]
    columns = ["side", "metric", "threshold", "null_median", "quantile", "null_size"]
    return Call(
        rows,
        pd.concat(thresholds, ignore_index=True)[columns],
        pd.concat(null_q, ignore_index=True)[["side", "metric", "q", "value"]],
    )


def paper_rule(m: LensMeasures, k: int) -> pd.Series:
    """``paper_p75``: top-k z above the P75 of the same sample's own directions (true of a quarter by construction)."""
    z = pd.Series(m.topk_z[k])
    return z > z.groupby(m.keys["sample"].to_numpy()).transform(lambda s: s.quantile(PAPER_QUANTILE))


def _fractions(called: pd.Series, keys: pd.DataFrame, identity: pd.Series, **labels: object) -> list[dict]:
    out = []
    for sample in CALLED_SAMPLES:
        mask = (keys["sample"] == sample).to_numpy()
        hits, ident = called.to_numpy()[mask], identity.to_numpy()[mask]
        out.append(
            labels
            | {
                "sample": sample,
                "n": int(mask.sum()),
                "hits": int(hits.sum()),
                "fraction": float(hits.mean()) if mask.any() else float("nan"),
                "n_without_token_identity": int((~ident).sum()),
                "hits_without_token_identity": int((hits & ~ident).sum()),
            }
        )
    return out


def output_predicting(m: LensMeasures, null: str, quantile: float, k: int) -> np.ndarray:
    """``call_classes(m, null, quantile, k).rows["output_predicting"]`` without the frames (the sensitivity grid):
    top-k z and each output-side metric above its null quantile, THE RULE on the metrics."""
    on_null = (m.keys["sample"] == NULLS[null]).to_numpy()

    def passes(values: np.ndarray) -> np.ndarray:
        calibrating = values[on_null]
        return values > np.quantile(calibrating[~np.isnan(calibrating)], quantile)

    output = m.sides["output"][k]
    semantic = semantic_rule(np.stack([passes(output[metric].to_numpy(dtype=np.float64)) for metric in METRICS], 1))
    return passes(m.topk_z[k]) & semantic


def c1_sensitivity(m: LensMeasures, quantiles: tuple[float, ...] = SENSITIVITY_QUANTILES) -> pd.DataFrame:
    """The output-predicting fraction of features and control per ``rule, null, quantile, k`` (module doc)."""
    rows = []
    for k in m.ks:
        identity = token_identity(m, k)["token_identity"]
        for null in NULLS:
            for q in quantiles:
                called = pd.Series(output_predicting(m, null, q, k))
                rows += _fractions(called, m.keys, identity, rule="null_calibrated", null=null, quantile=q, k=k)
        rows += _fractions(
            paper_rule(m, k), m.keys, identity, rule="paper_p75", null="none", quantile=PAPER_QUANTILE, k=k
        )
    frame = pd.DataFrame(rows)
    frame["fraction_without_token_identity"] = frame["hits_without_token_identity"] / frame["n_without_token_identity"]
    return frame


@dataclass(frozen=True)
class FeatureClasses:
    """Every row (features, control and nulls, told apart by ``sample``) with its class columns under the default
    null; ``thresholds`` / ``null_quantiles`` for both nulls (column ``null``); the C1 sensitivity table."""

    rows: pd.DataFrame
    thresholds: pd.DataFrame
    null_quantiles: pd.DataFrame
    sensitivity: pd.DataFrame
    whitening_components: dict[str, int]

    @property
    def features(self) -> pd.DataFrame:
        return self.rows[self.rows["sample"] == "feature"].drop(columns="sample").reset_index(drop=True)

    def null_rate(self, null: str = DEFAULT_NULL) -> float:
        """Fraction of ``null``'s directions called output-predicting (the rule's false-positive rate)."""
        rows = self.rows[self.rows["sample"] == NULLS[null]]
        return float(rows["output_predicting"].mean()) if len(rows) else float("nan")


def classify_features(
    lens: dict[str, pd.DataFrame],
    normal: np.ndarray,
    unembedding: np.ndarray,
    embedding: np.ndarray,
    quantile: float = DEFAULT_QUANTILE,
    k: int = 10,
    null: str = DEFAULT_NULL,
) -> FeatureClasses:
    """All classes of one SAE from its lens tables (``core.stages.lens_stage``: rows of samples feature, control,
    null, matched_null) and the model's (vocab, d) unembedding / embedding.

    Row columns: ``sample, feature, topk_z, heavy_tailed, {out,in}_{levenshtein, cosine, concentration,
    n_excluded, n_collapsed, n_passes, semantic_score}, semantic_output, semantic_input, semantic,
    semantic_score, output_predicting, out_top_forms, in_top_forms, token_jaccard, top1_share, token_identity,
    {out,in}_whitening_components, threshold`` (top-k z threshold), ``null_quantile, null_size, null, rule, k``."""
    if k not in K_GRID or max(K_GRID) > CANDIDATES:
        raise ValueError(f"k must be one of {K_GRID} (the lens keeps {CANDIDATES} candidates)")
    if null not in NULLS:
        raise ValueError(f"unknown null {null!r}; known: {', '.join(NULLS)}")
    m = lens_measures(lens, normal, unembedding, embedding, k=k)
    calls = {name: call_classes(m, name, quantile, k) for name in NULLS}
    string_rows = pd.concat(
        [
            calibrate(pd.DataFrame({"levenshtein": m.string_null[side]}), quantile, ("levenshtein",))
            .as_frame()
            .assign(side=side)
            for side in SIDES
        ],
        ignore_index=True,
    )
    chosen = calls[null]
    rows = pd.concat([chosen.rows, token_identity(m, k).drop(columns=["sample", "feature"])], axis=1)
    rows["out_top_forms"] = [f[:k] for f in m.sets["output"].forms]
    rows["in_top_forms"] = [f[:k] for f in m.sets["input"].forms]
    z_threshold = chosen.thresholds.loc[chosen.thresholds["metric"] == "topk_z", "threshold"].iloc[0]
    rows = rows.assign(
        out_whitening_components=m.whitening_components["output"],
        in_whitening_components=m.whitening_components["input"],
    )
    rows = rows.assign(
        threshold=z_threshold,
        null_quantile=quantile,
        null_size=int((m.keys["sample"] == NULLS[null]).sum()),
        null=null,
        rule="null_calibrated",
        k=k,
    )
    label = {"rule": "null_calibrated", "k": k}
    return FeatureClasses(
        rows=rows.sort_values(["sample", "feature"], ignore_index=True),
        thresholds=pd.concat(
            [c.thresholds.assign(null=n, **label) for n, c in calls.items()]
            + [string_rows.assign(null="string_permutation", **label)],
            ignore_index=True,
        ),
        null_quantiles=pd.concat([c.null_quantiles.assign(null=n) for n, c in calls.items()], ignore_index=True),
        sensitivity=c1_sensitivity(m),
        whitening_components=m.whitening_components,
    )
