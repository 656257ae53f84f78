"""Verdicts on the paper's claims, one row per release and (sub-)claim: table ``claim_verdicts``.

Every verdict is one of ``consistent``, ``not reproduced``, ``inconclusive``, ``not measured`` (with the
reason in ``rule``), takes the LAYER as the unit where the claim is about depth, and is about the
FEATURES against their control (``core.lens.control``: random directions with the SAE's own second moments,
run through the same lenses and circuits), so structure that lives in the model's weights alone — which
any direction would show — is not credited to the features. ``ALPHA`` is the one significance level.

* **C1** (about a quarter of features directly predict output tokens): the fraction of features called
  ``output_predicting`` (``core.analysis.classify``, SAE-matched null). Sub-claims with the same rule: ``C1 without
  token identity`` (current-token features left out), ``C1 isotropic null``; ``C1 paper_p75`` shows the paper's
  P75 rule, true by construction, always ``not measured``. Interval: the union of the 95 % Wilson interval
  (features as the unit) and the 95 % bootstrap interval over layers (layers resampled, weighted by their feature
  counts). ``consistent`` only when that interval lies INSIDE ``C1_BAND`` (equivalence, not mere overlap) and the
  features' Wilson interval lies above the control's; ``not reproduced`` when it lies outside the band;
  else ``inconclusive``.
* **C2 <phase>** (depth-dependent attention structure): per SAE layer, Δ_l = the ``LAYER_STATISTIC`` (P99) of
  the features' participation scores − that of the control's (null-z units, ``core.analysis.profiles``). A tail, not
  the mean: few features take part in attention, and the mean over all directions shifts with the SAE's own
  covariance — measured on planted-gemma, the control's mean matched the features' in every layer while the
  features' P99 carried the planted profile at 3–5× the control's. One pre-registered hypothesis per phase
  and model family (``C2_HYPOTHESIS``): a one-sided permutation test over layer order of the curvature of a
  quadratic through Δ_l (``core.analysis.statistics.shape_permutation_test``: the layer as the unit), and the same
  curvature's 95 % interval from resampling directions within each layer (the sampling error of each Δ_l,
  ``depth_curvature_interval``). ``consistent`` when p < ALPHA, that interval lies on the hypothesised side of
  0 and the fitted vertex lies inside depth [0.1, 0.9] — a shape must stand out of both the layer-to-layer
  variation and each layer's own sampling noise (on the null twins the permutation test alone, at its 5 %
  rate, called one chance U); ``not reproduced`` when the opposite shape is significant;
  else ``inconclusive``; ``not measured`` with fewer layers than a permutation test can use
  (``min_layers_for(ALPHA)`` = 4).
* **C3 attention <phase>, C3 magnitude <norm>** (semantic and non-semantic features differ; the paper says
  semantic ones are larger): van Elteren's stratified rank test with the layer as stratum (semantic vs
  non-semantic within each layer: no Simpson's paradox from pooling layers), one-sided (semantic larger),
  effect = within-layer AUROC with a 95 % CI. ``consistent`` when p < ALPHA and the CI lies above
  ``C3_MIN_AUROC`` (Vargha & Delaney's "small" effect, A = 0.56); ``not reproduced`` when the CI lies below
  it; else ``inconclusive``; ``not measured`` when no layer has ``C3_MIN_GROUP`` features in both groups or
  the variable has no spread (Gemma Scope's decoder rows are unit norm by training).
  ``control_value`` = the same effect among the control's directions (semantic by the same classifier).
* **C4** (Llama is higher in the decoder–unembedding phase): per SAE layer, (decoder − encoder) of the
  features' ``LAYER_STATISTIC`` minus the same for the control — both phases in the same null-z units, so the
  comparison is unitless. Mean over layers, a 95 % bootstrap interval over layers (descriptive) and
  an exact one-sided sign-flip test over layers (``core.analysis.statistics.sign_flip_test``); ``consistent`` when
  p(mean > 0) < ALPHA, ``not reproduced`` when p(mean < 0) < ALPHA, else ``inconclusive``. For other model
  families the value is reported and the verdict is ``not measured`` (the claim is about Llama).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from core.analysis.profiles import normalised_depth
from core.analysis.statistics import (
    layer_bootstrap,
    min_layers_for,
    quadratic_fit,
    shape_permutation_test,
    sign_flip_test,
    stratified_rank_test,
    summary_statistic,
    wilson_interval,
)

ALPHA = 0.05
C1_BAND = (0.20, 0.30)
C3_MIN_AUROC = 0.56
C3_MIN_GROUP = 10
VERTEX_RANGE = (0.1, 0.9)
LAYER_STATISTIC = "p99"  # core.analysis.statistics.summary_statistic name of the per-layer participation statistic
# The reconstruction's pre-registered depth shapes (the abstract says only "depth-dependent structure"):
# one hypothesis per (model family, phase), tested once. Change it here, never per run.
C2_HYPOTHESIS: dict[str, dict[str, str]] = {
    "gemma2": {"encoder_embedding": "U", "decoder_unembedding": "inverted-U"},
    "gemma3": {"encoder_embedding": "U", "decoder_unembedding": "inverted-U"},
    "llama": {"encoder_embedding": "inverted-U", "decoder_unembedding": "U"},
}
PHASE_SCORES = {"encoder_embedding": "score_encoder_embedding", "decoder_unembedding": "score_decoder_unembedding"}
C3_VARIABLES = {
    "C3 attention encoder_embedding": "score_encoder_embedding",
    "C3 attention decoder_unembedding": "score_decoder_unembedding",
    "C3 magnitude encoder_norm": "encoder_norm",
    "C3 magnitude decoder_norm": "decoder_norm",
}
VERDICTS = ("consistent", "not reproduced", "inconclusive", "not measured")
COLUMNS = [
    "release",
    "claim",
    "verdict",
    "statistic",
    "value",
    "ci_low",
    "ci_high",
    "control_value",
    "p_value",
    "n",
    "rule",
]
NAN = float("nan")


def _row(
    claim: str,
    verdict: str,
    statistic: str,
    rule: str,
    value: float = NAN,
    ci: tuple[float, float] = (NAN, NAN),
    control: float = NAN,
    p: float = NAN,
    n: int = 0,
) -> dict:
    return {
        "claim": claim,
        "verdict": verdict,
        "statistic": statistic,
        "value": value,
        "ci_low": ci[0],
        "ci_high": ci[1],
        "control_value": control,
        "p_value": p,
        "n": n,
        "rule": rule,
    }


def c1_counts(per_feature: pd.DataFrame, exclude: str | None = None) -> pd.DataFrame:
    """``sample, layer, hits, n`` of ``output_predicting`` per sample and layer (rows where the boolean column
    ``exclude`` is true left out)."""
    rows = per_feature if exclude is None else per_feature[~per_feature[exclude].astype(bool)]
    return rows.groupby(["sample", "layer"], as_index=False).agg(
        hits=("output_predicting", "sum"), n=("output_predicting", "size")
    )


def c1_verdict(counts: pd.DataFrame, claim: str = "C1", setting: str = "") -> dict:
    """C1 from per-layer counts (``c1_counts``; samples feature and control); ``setting`` names the class rule."""
    statistic = "fraction of features output-predicting"
    feats, ctrl = (counts[counts["sample"] == s] for s in ("feature", "control"))
    hits, n = int(feats["hits"].sum()), int(feats["n"].sum())
    if n == 0:
        return _row(claim, "not measured", statistic, f"{setting}no classified features")
    low, high = wilson_interval(hits, n)
    if len(feats) >= 2:
        b_low, b_high = layer_bootstrap((feats["hits"] / feats["n"]).to_numpy(), weights=feats["n"].to_numpy())
        low, high = min(low, b_low), max(high, b_high)
    c_hits, c_n = int(ctrl["hits"].sum()), int(ctrl["n"].sum())
    c_high = wilson_interval(c_hits, c_n)[1] if c_n else NAN
    rule = (
        f"{setting}consistent: Wilson ∪ layer-bootstrap 95 % interval inside [{C1_BAND[0]}, {C1_BAND[1]}] and "
        "the features' Wilson interval above the control's; not reproduced: interval outside the band"
    )
    inside = C1_BAND[0] <= low and high <= C1_BAND[1]
    above_control = not c_n or wilson_interval(hits, n)[0] > c_high
    if inside and above_control:
        verdict = "consistent"
    elif high < C1_BAND[0] or low > C1_BAND[1]:
        verdict = "not reproduced"
    else:
        verdict = "inconclusive"
    return _row(claim, verdict, statistic, rule, hits / n, (low, high), c_hits / c_n if c_n else NAN, n=n)


def _setting(per_feature: pd.DataFrame) -> tuple[str, float, int] | None:
    """The class setting of ``per_feature``: (null, quantile, k), None where the table does not record it."""
    if not {"null", "null_quantile", "k"} <= set(per_feature):
        return None
    first = per_feature.iloc[0]
    return str(first["null"]), float(first["null_quantile"]), int(first["k"])


def c1_verdicts(per_feature: pd.DataFrame, sensitivity: pd.DataFrame) -> list[dict]:
    """C1 under the default rule, without token-identity features, under the other null (from ``sensitivity``,
    ``core.analysis.classify.c1_sensitivity`` rows with ``layer``) and the paper's P75 rule (never a verdict: true by
    construction)."""
    setting = _setting(per_feature) if len(per_feature) else None
    if setting is None:
        return [
            c1_verdict(
                c1_counts(per_feature) if len(per_feature) else pd.DataFrame(columns=["sample", "layer", "hits", "n"])
            )
        ]
    null, quantile, k = setting
    label = f"null_calibrated ({null} null, P{100 * quantile:g}, k={k}); "
    rows = [c1_verdict(c1_counts(per_feature), "C1", label)]
    if "token_identity" in per_feature:
        rows.append(c1_verdict(c1_counts(per_feature, "token_identity"), "C1 without token identity", label))
    if sensitivity.empty:
        return rows
    same = sensitivity[
        (sensitivity["k"] == k)
        & (sensitivity["rule"] == "null_calibrated")
        & np.isclose(sensitivity["quantile"], quantile)
    ]

    def per_layer(f: pd.DataFrame) -> pd.DataFrame:
        return f.groupby(["sample", "layer"], as_index=False)[["hits", "n"]].sum()

    for other in sorted(set(same["null"]) - {null}):
        rows.append(
            c1_verdict(
                per_layer(same[same["null"] == other]),
                f"C1 {other} null",
                f"null_calibrated ({other} null, P{100 * quantile:g}, k={k}); ",
            )
        )
    paper = sensitivity[(sensitivity["rule"] == "paper_p75") & (sensitivity["k"] == k)]
    if len(paper):
        measured = c1_verdict(per_layer(paper), "C1 paper_p75")
        rows.append(
            measured
            | {
                "verdict": "not measured",
                "ci_low": NAN,
                "ci_high": NAN,
                "rule": (
                    "paper_p75 (top-k z above the P75 of the features' own values): "
                    "a quarter of ANY set of directions passes "
                    "it — true by construction, so no verdict; compare the control's value"
                ),
            }
        )
    return rows


def _layer_stats(per_feature: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per layer: the features' and the control's ``LAYER_STATISTIC`` of ``column`` (layers where both have
    values)."""
    groups = per_feature.dropna(subset=[column]).groupby(["layer", "sample"])[column]
    stats = groups.agg(lambda v: float(summary_statistic(v.to_numpy(dtype=np.float64), LAYER_STATISTIC)))
    return stats.unstack("sample").reindex(columns=["feature", "control"]).dropna().sort_index()


def c2_verdict(per_feature: pd.DataFrame, phase: str, family: str, n_layers: int) -> dict:
    """C2 for one phase (module doc)."""
    claim, column = f"C2 {phase}", PHASE_SCORES[phase]
    shape = C2_HYPOTHESIS.get(family, {}).get(phase)
    statistic = f"curvature of {LAYER_STATISTIC} features − control over depth, sign of a {shape} (null-z units)"
    if shape is None:
        return _row(claim, "not measured", statistic, f"no pre-registered shape for model family {family!r}")
    if column not in per_feature:
        return _row(claim, "not measured", statistic, "no attention statistics")
    means = _layer_stats(per_feature, column)
    need = min_layers_for(ALPHA)
    if len(means) < need:
        return _row(
            claim,
            "not measured",
            statistic,
            f"{len(means)} layer(s) with this phase measured: a permutation test over layer order needs {need}",
            n=len(means),
        )
    depth = normalised_depth(means.index.to_numpy(), n_layers)
    test = shape_permutation_test((means["feature"] - means["control"]).to_numpy(), depth, shape)
    control = shape_permutation_test(means["control"].to_numpy(), depth, shape).statistic
    low, high = depth_curvature_interval(per_feature, column, means.index.to_numpy(), depth, shape)
    rule = (
        f"pre-registered {shape}; consistent: one-sided permutation p < {ALPHA} over {test.n_permutations} layer "
        f"orders, the within-layer bootstrap interval of the signed curvature above 0 ({low:.2f}–{high:.2f}) and "
        f"vertex in {list(VERTEX_RANGE)} (vertex {test.vertex:.2f}); not reproduced: the opposite shape significant "
        f"(p {test.p_opposite:.3f})"
    )
    if test.p_value < ALPHA and low > 0 and VERTEX_RANGE[0] <= test.vertex <= VERTEX_RANGE[1]:
        verdict = "consistent"
    elif test.p_opposite < ALPHA:
        verdict = "not reproduced"
    else:
        verdict = "inconclusive"
    return _row(claim, verdict, statistic, rule, test.statistic, (low, high), control, test.p_value, len(means))


def depth_curvature_interval(
    per_feature: pd.DataFrame,
    column: str,
    layers: np.ndarray,
    depth: np.ndarray,
    shape: str,
    n_boot: int = 400,
    seed: int = 0,
) -> tuple[float, float]:
    """95 % percentile interval of the signed curvature (+ for a U) of the quadratic through the per-layer
    Δ_l = ``LAYER_STATISTIC`` (features) − ``LAYER_STATISTIC`` (control), features and control resampled with
    replacement within each layer."""
    rng = np.random.default_rng(seed)
    sign = 1.0 if shape == "U" else -1.0
    boots = np.empty((len(layers), n_boot))
    for i, layer in enumerate(layers):
        rows = per_feature[(per_feature["layer"] == layer)].dropna(subset=[column])
        parts = []
        for sample in ("feature", "control"):
            v = rows.loc[rows["sample"] == sample, column].to_numpy(dtype=np.float64)
            parts.append(summary_statistic(v[rng.integers(0, len(v), (n_boot, len(v)))], LAYER_STATISTIC))
        boots[i] = parts[0] - parts[1]
    curvature = sign * quadratic_fit(np.asarray(depth, dtype=np.float64), boots)[2]
    low, high = np.quantile(curvature, [0.025, 0.975])
    return float(low), float(high)


def _strata(frame: pd.DataFrame, column: str) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for _, layer in frame.dropna(subset=[column]).groupby("layer"):
        x = layer.loc[layer["semantic"].astype(bool), column].to_numpy(dtype=np.float64)
        y = layer.loc[~layer["semantic"].astype(bool), column].to_numpy(dtype=np.float64)
        if len(x) >= C3_MIN_GROUP and len(y) >= C3_MIN_GROUP:
            out.append((x, y))
    return out


def c3_verdict(per_feature: pd.DataFrame, claim: str) -> dict:
    """One C3 sub-claim (module doc)."""
    column = C3_VARIABLES[claim]
    statistic = f"within-layer AUROC of {column}, semantic > non-semantic"
    if column not in per_feature:
        return _row(claim, "not measured", statistic, f"no {column} values")
    feats, ctrl = (per_feature[per_feature["sample"] == s] for s in ("feature", "control"))
    values = feats[column].dropna().to_numpy(dtype=np.float64)
    if len(values) and np.ptp(values) <= 1e-6 * max(1.0, float(np.abs(values).max())):
        return _row(
            claim,
            "not measured",
            statistic,
            f"{column} has no spread (e.g. Gemma Scope's unit-norm decoder rows): nothing to compare",
            n=len(feats),
        )
    strata = _strata(feats, column)
    if not strata:
        return _row(
            claim,
            "not measured",
            statistic,
            f"no layer has {C3_MIN_GROUP} semantic and {C3_MIN_GROUP} non-semantic features",
            n=len(feats),
        )
    test = stratified_rank_test(strata)
    control = stratified_rank_test(_strata(ctrl, column), n_boot=0).auroc
    rule = (
        f"van Elteren over {test.strata} layer(s); consistent: one-sided p < {ALPHA} and AUROC CI above "
        f"{C3_MIN_AUROC}; not reproduced: CI below {C3_MIN_AUROC}"
    )
    if test.p_greater < ALPHA and test.ci_low > C3_MIN_AUROC:
        verdict = "consistent"
    elif test.ci_high < C3_MIN_AUROC:
        verdict = "not reproduced"
    else:
        verdict = "inconclusive"
    return _row(
        claim,
        verdict,
        statistic,
        rule,
        test.auroc,
        (test.ci_low, test.ci_high),
        control,
        test.p_greater,
        test.n_x + test.n_y,
    )


def c4_verdict(per_feature: pd.DataFrame, family: str) -> dict:
    """C4 (module doc)."""
    statistic = f"decoder − encoder phase {LAYER_STATISTIC}, features − control (null-z units)"
    columns = list(PHASE_SCORES.values())
    if not set(columns) <= set(per_feature):
        return _row("C4", "not measured", statistic, "no attention statistics")
    both = per_feature.dropna(subset=columns)
    enc, dec = _layer_stats(both, columns[0]), _layer_stats(both, columns[1])
    means = dec - enc
    if len(means) < 2:
        return _row("C4", "not measured", statistic, f"{len(means)} layer(s) with both phases: need 2", n=len(means))
    excess = (means["feature"] - means["control"]).to_numpy()
    ci = layer_bootstrap(excess)
    p_higher, p_lower = sign_flip_test(excess)
    value, control = float(excess.mean()), float(means["control"].mean())
    if family != "llama":
        return _row(
            "C4",
            "not measured",
            statistic,
            f"the claim is about Llama ({family}: value reported)",
            value,
            ci,
            control,
            p_higher,
            len(means),
        )
    verdict = "consistent" if p_higher < ALPHA else "not reproduced" if p_lower < ALPHA else "inconclusive"
    rule = (
        f"exact sign-flip test over {len(means)} layers; consistent: p(decoder higher) < {ALPHA}; not reproduced: "
        f"p(encoder higher) {p_lower:.3f} < {ALPHA}"
    )
    return _row("C4", verdict, statistic, rule, value, ci, control, p_higher, len(means))


def claim_verdicts(
    release: str, family: str, n_layers: int, per_feature: pd.DataFrame, sensitivity: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Every claim's row (``COLUMNS``) for one release from its per-direction table: ``sample`` ('feature' |
    'control'), ``layer``, ``output_predicting``, ``token_identity``, ``semantic``, ``encoder_norm``,
    ``decoder_norm``, the class setting ``null, null_quantile, k`` and the phase scores
    ``score_encoder_embedding`` / ``score_decoder_unembedding`` (NaN where a phase has no circuit); the C1 rows
    under other settings from ``sensitivity`` (``core.analysis.classify.c1_sensitivity`` with ``layer``)."""
    rows = c1_verdicts(per_feature, pd.DataFrame() if sensitivity is None else sensitivity)
    rows += [c2_verdict(per_feature, phase, family, n_layers) for phase in PHASE_SCORES]
    rows += [c3_verdict(per_feature, claim) for claim in C3_VARIABLES]
    rows.append(c4_verdict(per_feature, family))
    return pd.DataFrame(rows).assign(release=release)[COLUMNS]
