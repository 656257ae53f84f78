"""The paper's claims, measured: values, verdicts and the markdown report (one per release).

C1 (arXiv 2601.22447): about one quarter of features directly predict output tokens. Measured: the
   fraction called ``output_predicting`` by ``core.classify`` (heavy-tailed output lens AND semantic
   output tokens, both at null P99), per layer with 95 % Wilson intervals and over the release.
   Verdict *consistent* when the release-wide interval overlaps [0.20, 0.30], else *not reproduced*.
C2: attention participation has a depth structure (U / inverted-U). Measured: quadratic fit of the
   per-layer MEAN participation score over normalised depth (``core.profiles``), curvature's 95 %
   bootstrap CI → U / inverted-U / monotone / flat, per phase. Verdict *consistent* when at least one
   phase is U or inverted-U.
C3: semantic and non-semantic features differ in attention participation and weight magnitudes.
   Measured: Mann–Whitney U (tie-corrected normal approximation) and rank-biserial effect size of the
   per-feature participation scores (both phases) and raw encoder / decoder norms. Verdict *consistent*
   when every participation score and at least one norm differ at p < 0.01.
C4: phase means — on Llama the decoder–unembedding phase is higher. Measured: mean participation score
   per phase with a paired bootstrap CI of the difference. Units differ between phases (QK score vs OV
   write norm), so the comparison is of excesses over each phase's own null. Verdict for Llama-format
   releases: *consistent* when decoder–unembedding is higher; for other releases the direction is
   reported only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from core.profiles import compare_groups, depth_profile, phase_means, shape_tests
from core.registry import Release
from core.statistics import auroc, wilson_interval
from core.truth import planted_semantic_features

PAPER_C1 = "About one quarter of SAE features directly predict output tokens."
PAPER_C2 = "Attention participation varies with depth in U / inverted-U shapes."
PAPER_C3 = "Semantic and non-semantic features differ in attention participation and weight magnitudes."
PAPER_C4 = "Phase means differ by model; Llama is higher in the decoder–unembedding phase."
C1_BAND = (0.20, 0.30)
ALPHA = 0.01


def output_fraction_by_layer(classes: pd.DataFrame) -> pd.DataFrame:
    """Per (release, layer, sae_id): n features, hits, fraction and its 95 % Wilson interval."""
    grouped = classes.groupby(["release", "layer", "sae_id"], as_index=False).agg(
        n=("feature", "size"), hits=("output_predicting", "sum")
    )
    grouped["fraction"] = grouped["hits"] / grouped["n"]
    intervals = [wilson_interval(int(h), int(n)) for h, n in zip(grouped["hits"], grouped["n"])]
    grouped["ci_low"] = [lo for lo, _ in intervals]
    grouped["ci_high"] = [hi for _, hi in intervals]
    return grouped.sort_values(["release", "layer", "sae_id"], ignore_index=True)


@dataclass(frozen=True)
class Recovery:
    """How well the calls recover a planted truth set of output-predicting features."""

    truth_fraction: float
    precision: float
    recall: float


def recovery(classes: pd.DataFrame, truth: dict[str, set[int]], column: str = "output_predicting") -> Recovery:
    """Precision/recall of ``column`` against planted feature sets per sae_id."""
    tp = fp = fn = total = 0
    for sae_id, rows in classes.groupby("sae_id"):
        planted = truth.get(str(sae_id), set())
        called = set(rows.loc[rows[column].astype(bool), "feature"].astype(int))
        tp, fp, fn = tp + len(called & planted), fp + len(called - planted), fn + len(planted - called)
        total += len(rows)
    truth_size = tp + fn
    return Recovery(
        truth_fraction=truth_size / total if total else float("nan"),
        precision=tp / (tp + fp) if tp + fp else float("nan"),
        recall=tp / truth_size if truth_size else float("nan"),
    )


def planted_strength(truth: dict, n_layers: int) -> pd.DataFrame:
    """Planted attention strengths from planted_truth.json: ``phase, layer, depth, strength`` (mean over
    heads of ``attention.<phase>.strength[layer][head]``)."""
    rows = []
    for phase in ("encoder_embedding", "decoder_unembedding"):
        for layer, heads in enumerate(truth["attention"][phase]["strength"]):
            rows.append({"phase": phase, "layer": layer, "depth": layer / max(n_layers - 1, 1), "strength": float(np.mean(heads))})
    return pd.DataFrame(rows)


@dataclass
class PlantedTruth:
    """Ground truth beside the measured values (planted releases)."""

    output: Recovery
    semantic_auroc: float
    shapes: dict[str, str]  # phase -> planted shape
    strength_means: dict[str, float]  # phase -> mean planted strength
    encoder_norm_ratio: float  # mean semantic / mean non-semantic (planted)
    decoder_norm_ratio: float


@dataclass
class ReleaseResults:
    """Everything the report of one release shows."""

    release: str
    architecture: str
    by_layer: pd.DataFrame
    shapes: pd.DataFrame
    comparison: pd.DataFrame
    phases: pd.DataFrame
    thresholds: pd.DataFrame
    null_rate: float
    semantic_fraction: float
    missing_layers: list[int]
    truth: PlantedTruth | None = None
    measured_norm_ratio: dict[str, float] = field(default_factory=dict)
    profile: pd.DataFrame = field(default_factory=pd.DataFrame)  # core.profiles.depth_profile
    head_participation: pd.DataFrame = field(default_factory=pd.DataFrame)  # attention_participation rows
    per_feature: pd.DataFrame = field(default_factory=pd.DataFrame)  # classes + norms + scores, one row per feature
    null_rows: pd.DataFrame = field(default_factory=pd.DataFrame)  # semantic_null rows
    truth_strength: pd.DataFrame | None = None


def per_feature_table(classes: pd.DataFrame, norms: pd.DataFrame, feature_part: pd.DataFrame) -> pd.DataFrame:
    """One row per (sae_id, feature): the class columns, raw ``encoder_norm`` / ``decoder_norm`` and the
    per-phase mean participation scores ``score_encoder_embedding`` / ``score_decoder_unembedding``."""
    keys = ["release", "sae_id", "layer", "feature"]
    out = classes.merge(norms[keys + ["encoder_norm", "decoder_norm"]], on=keys, how="left")
    if len(feature_part):
        scores = feature_part.pivot_table(index=keys, columns="phase", values="mean_score").add_prefix("score_").reset_index()
        out = out.merge(scores, on=keys, how="left")
    return out


def release_results(
    release: str,
    architecture: str,
    n_layers: int,
    classes: pd.DataFrame,
    null_rows: pd.DataFrame,
    thresholds: pd.DataFrame,
    norms: pd.DataFrame,
    head_part: pd.DataFrame,
    feature_part: pd.DataFrame,
    truth: dict | None = None,
    n_boot: int = 1000,
) -> ReleaseResults:
    """Every measured quantity of one release from its tables (each already filtered to the release)."""
    by_layer = output_fraction_by_layer(classes)
    per_feature = per_feature_table(classes, norms, feature_part)
    variables = [c for c in ("score_encoder_embedding", "score_decoder_unembedding", "encoder_norm", "decoder_norm") if c in per_feature]
    empty = pd.DataFrame(columns=["phase", "statistic", "shape", "curvature", "ci_low", "ci_high"])
    has_attention = len(feature_part) > 0
    ratio = {c: float(per_feature.loc[per_feature.semantic, c].mean() / per_feature.loc[~per_feature.semantic, c].mean())
             for c in ("encoder_norm", "decoder_norm") if c in per_feature}
    results = ReleaseResults(
        release=release,
        architecture=architecture,
        by_layer=by_layer,
        shapes=shape_tests(feature_part, n_layers, n_boot=n_boot) if has_attention else empty,
        comparison=compare_groups(per_feature, "semantic", variables),
        phases=phase_means(feature_part, n_boot=n_boot) if has_attention else pd.DataFrame(),
        thresholds=thresholds.groupby(["side", "metric"], as_index=False).agg(
            threshold=("threshold", "median"), null_median=("null_median", "median"), quantile=("quantile", "first"),
            null_size=("null_size", "first"), saes=("threshold", "size")),
        null_rate=float(null_rows["output_predicting"].mean()) if len(null_rows) else float("nan"),
        semantic_fraction=float(classes["semantic"].mean()),
        missing_layers=sorted(set(range(n_layers)) - set(by_layer["layer"].astype(int))),
        measured_norm_ratio=ratio,
        profile=depth_profile(feature_part, n_layers) if has_attention else pd.DataFrame(),
        head_participation=head_part,
        per_feature=per_feature,
        null_rows=null_rows,
    )
    if truth is not None:
        semantic = planted_semantic_features(truth)
        labels = [int(f) in semantic.get(str(s), set()) for s, f in zip(per_feature["sae_id"], per_feature["feature"])]
        strength = planted_strength(truth, n_layers)
        planted_sem = [f for sae in truth["saes"].values() for f in sae["semantic_features"]]
        results.truth = PlantedTruth(
            output=recovery(classes, semantic),
            semantic_auroc=auroc(per_feature["semantic_score"].to_numpy(), np.array(labels)),
            shapes={p: truth["attention"][p]["shape"] for p in ("encoder_embedding", "decoder_unembedding")},
            strength_means=strength.groupby("phase")["strength"].mean().to_dict(),
            encoder_norm_ratio=float(np.mean([f["encoder_norm"] for f in planted_sem])
                                     / np.mean([s["non_semantic_encoder_norm_mean"] for s in truth["saes"].values()])),
            decoder_norm_ratio=float(np.mean([f["decoder_norm"] for f in planted_sem])
                                     / np.mean([s["non_semantic_decoder_norm_mean"] for s in truth["saes"].values()])),
        )
        results.truth_strength = strength
    return results


CLASS_TABLES = ("feature_classes", "semantic_null", "class_thresholds", "sae_features", "attention_participation",
                 "feature_participation")
ARCHITECTURE = {"gemma_scope_npz": "gemma2", "llama_scope_safetensors": "llama", "gemma_scope_2_safetensors": "gemma3"}  # SAE format -> model family


def results_from_tables(release: Release, tables: dict[str, pd.DataFrame], truth: dict | None = None,
                        n_boot: int = 1000) -> ReleaseResults:
    """``release_results`` of one release from the stored ``CLASS_TABLES`` (all releases; filtered here)."""
    pick = {name: frame[frame["release"] == release.id] if len(frame) else frame for name, frame in tables.items()}
    return release_results(
        release.id, ARCHITECTURE.get(release.format, release.format), release.n_layers, pick["feature_classes"],
        pick["semantic_null"], pick["class_thresholds"], pick["sae_features"], pick["attention_participation"],
        pick["feature_participation"], truth, n_boot,
    )


def c1(results: ReleaseResults) -> tuple[str, str]:
    n, hits = int(results.by_layer["n"].sum()), int(results.by_layer["hits"].sum())
    low, high = wilson_interval(hits, n)
    fraction = hits / n if n else float("nan")
    verdict = "consistent" if low <= C1_BAND[1] and high >= C1_BAND[0] else "not reproduced"
    return f"{fraction:.3f} (95 % CI {low:.3f}–{high:.3f})", verdict


def c2(results: ReleaseResults) -> tuple[str, str]:
    means = results.shapes[results.shapes["statistic"] == "mean"]
    if means.empty:
        return "no attention statistics", "not measured"
    text = "; ".join(
        f"{r.phase.split('_')[0]}: {r.shape} (curvature {r.curvature:.2f}, CI {r.ci_low:.2f}–{r.ci_high:.2f})" for r in means.itertuples()
    )
    return text, "consistent" if means["shape"].isin(["U", "inverted-U"]).any() else "not reproduced"


def c3(results: ReleaseResults) -> tuple[str, str]:
    comp = results.comparison
    if comp.empty or comp["n_true"].min() == 0 or comp["n_false"].min() == 0:
        return "too few semantic or non-semantic features", "not measured"
    text = "; ".join(f"{r.variable}: r_rb {r.rank_biserial:+.2f}, p {r.p_value:.1e}" for r in comp.itertuples())
    attention = comp[comp["variable"].str.startswith("score_")]
    norms = comp[comp["variable"].str.endswith("_norm")]
    ok = bool((attention["p_value"] < ALPHA).all()) and bool((norms["p_value"] < ALPHA).any())
    return text, "consistent" if ok else "not reproduced"


def c4(results: ReleaseResults) -> tuple[str, str]:
    if results.phases.empty:
        return "no attention statistics", "not measured"
    r = results.phases.iloc[0]
    text = (f"encoder–embedding {r.encoder_embedding:.3f}, decoder–unembedding {r.decoder_unembedding:.3f}; "
            f"difference {r.difference:+.3f} (95 % CI {r.ci_low:+.3f}–{r.ci_high:+.3f}); higher: {r.higher}")
    if results.architecture != "llama":
        return text, f"direction reported ({results.architecture}: the claim is about Llama)"
    return text, "consistent" if r.higher == "decoder_unembedding" else "not reproduced"


def render_report(results: ReleaseResults, plots: dict[str, str]) -> str:
    """Markdown: per claim the paper's statement, the measured value, the verdict and the plot (``plots``:
    plot asset name -> file name beside the report); planted ground truth when known; the layers with no
    SAE analysed; the thresholds used."""
    by_layer = results.by_layer
    n = int(by_layer["n"].sum())
    missing = results.missing_layers
    rows = [("C1 output-predicting fraction", PAPER_C1, *c1(results)),
            ("C2 attention depth profiles", PAPER_C2, *c2(results)),
            ("C3 semantic vs non-semantic", PAPER_C3, *c3(results)),
            ("C4 phase means", PAPER_C4, *c4(results))]
    lines = [
        f"# {results.release}: weight-only claims report",
        "",
        f"SAEs analysed: {len(by_layer)} (layers {', '.join(map(str, by_layer['layer'].tolist()))}); features: {n}; "
        f"semantic (either side): {results.semantic_fraction:.3f}."
        + (f" **Layers without an analysed SAE: {', '.join(map(str, missing))}** — depth profiles and shape fits use "
           "the analysed layers only." if missing else ""),
        "",
        "| claim | paper | measured here | verdict |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
        "",
    ]
    t = results.truth
    if t is not None:
        shape_rows = results.shapes[results.shapes["statistic"] == "mean"].set_index("phase")["shape"].to_dict()
        measured_fraction = by_layer["hits"].sum() / max(n, 1)
        lines += [
            "## Planted ground truth beside the measured values",
            "",
            "| quantity | planted | measured |",
            "|---|---|---|",
            f"| output-predicting fraction | {t.output.truth_fraction:.3f} | {measured_fraction:.3f} "
            f"(precision {t.output.precision:.3f}, recall {t.output.recall:.3f}) |",
            f"| semantic vs non-semantic separation | planted labels | AUROC of semantic score {t.semantic_auroc:.4f} |",
            *[f"| {phase} depth shape | {t.shapes[phase]} | {shape_rows.get(phase, 'not measured')} |" for phase in t.shapes],
            *[f"| {phase} mean strength | {t.strength_means[phase]:.3f} (planted s) | "
              f"{results.phases.iloc[0][phase] if not results.phases.empty else float('nan'):.3f} (score units) |" for phase in t.strength_means],
            f"| encoder norm ratio semantic / non-semantic | {t.encoder_norm_ratio:.3f} | {results.measured_norm_ratio.get('encoder_norm', float('nan')):.3f} |",
            f"| decoder norm ratio semantic / non-semantic | {t.decoder_norm_ratio:.3f} | {results.measured_norm_ratio.get('decoder_norm', float('nan')):.3f} |",
            "",
        ]
    plot = plots.get
    lines += [
        "## C1 by layer", "",
        f"![output-predicting fraction by layer]({plot('plot_output_fraction')})" if plot("plot_output_fraction") else "",
        "",
        by_layer[["layer", "sae_id", "n", "hits", "fraction", "ci_low", "ci_high"]].to_markdown(index=False, floatfmt=".3f"),
        "",
        f"Null false-positive rate of the whole rule (fraction of random directions called output-predicting): {results.null_rate:.4f}.",
        "",
        "## C2 depth profiles", "",
        f"![depth profiles]({plot('plot_depth_profiles')})" if plot("plot_depth_profiles") else "",
        "",
        f"![layer × head participation]({plot('plot_participation_heatmap')})" if plot("plot_participation_heatmap") else "",
        "",
        results.shapes.to_markdown(index=False, floatfmt=".3f") if not results.shapes.empty else "no attention statistics",
        "",
        "## C3 semantic vs non-semantic", "",
        f"![semantic vs non-semantic]({plot('plot_semantic_violins')})" if plot("plot_semantic_violins") else "",
        "",
        results.comparison.to_markdown(index=False, floatfmt=".3g") if not results.comparison.empty else "",
        "",
        "## C4 phase means", "",
        results.phases.to_markdown(index=False, floatfmt=".3f") if not results.phases.empty else "no attention statistics",
        "",
        "## Calibration", "",
        f"![null vs observed]({plot('plot_calibration')})" if plot("plot_calibration") else "",
        "",
        "Thresholds used (median over the release's SAEs; each SAE is calibrated on its own null):",
        "",
        results.thresholds.to_markdown(index=False, floatfmt=".4g") if not results.thresholds.empty else "",
        "",
        "## Method (reconstructed: the paper's code is not public)", "",
        "- Output-predicting: top-10 z-score of the output-lens logits above the null P99 AND semantic output "
        "tokens (core/classify.py).",
        "- Semantic (per side): at least 2 of 3 coherence tests above their null P99 — mean pairwise normalised "
        "Levenshtein similarity of the normalised top-10 tokens, mean pairwise cosine of their (un)embedding "
        "vectors, −entropy of the softmax over the vocabulary (core/semantic.py); semantic = either side.",
        "- Participation: encoder–embedding = max over the two QK circuits of the top-10 pre-softmax score minus "
        "the null median; decoder–unembedding = OV write norm minus the null median; a feature participates in a "
        "head above the null P99 of that head (core/profiles.py).",
        "- Shapes: quadratic over normalised depth, 95 % bootstrap CI of the curvature (features resampled "
        "within layers); U / inverted-U only when the vertex lies in [0.1, 0.9].",
        "",
    ]
    return "\n".join(lines)
