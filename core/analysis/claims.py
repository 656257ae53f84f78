"""The paper's claims, measured: per-release results, the verdict table and the markdown report.

Every quantity is computed for the SAE's features AND for its control (``core.lens.control``: random directions
with the SAE's own second moments through the same lenses and circuits); the verdicts
(``core.analysis.verdicts``, table ``claim_verdicts``) are about the features against that control, with the layer as
the unit where the claim is about depth. Scores are null-z values (``core.analysis.profiles``): unitless and
invariant to function-preserving rewrites of the weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from core.analysis.agreement import release_agreement
from core.analysis.classify import NULLS
from core.analysis.power import class_recovery_table, hard_case_table, power_table
from core.analysis.profiles import depth_profile
from core.analysis.statistics import auroc, wilson_interval
from core.analysis.verdicts import ALPHA, C1_BAND, C2_HYPOTHESIS, VERDICTS, claim_verdicts
from core.registry import Release
from core.testbeds.truth import planted_semantic_features

PAPER = {
    "C1": "About one quarter of SAE features directly predict output tokens.",
    "C2": "Features take part in attention with depth-dependent structure.",
    "C3": "Semantic and non-semantic features differ in attention circuits and weight magnitudes (semantic larger).",
    "C4": "Phase means differ by model; Llama is higher in the decoder–unembedding phase.",
}


def output_fraction_by_layer(classes: pd.DataFrame) -> pd.DataFrame:
    """Per (release, sample, layer, sae_id): n directions, hits, fraction and its 95 % Wilson interval."""
    grouped = classes.groupby(["release", "sample", "layer", "sae_id"], as_index=False).agg(
        n=("feature", "size"), hits=("output_predicting", "sum")
    )
    grouped["fraction"] = grouped["hits"] / grouped["n"]
    intervals = [wilson_interval(int(h), int(n)) for h, n in zip(grouped["hits"], grouped["n"])]
    grouped["ci_low"] = [lo for lo, _ in intervals]
    grouped["ci_high"] = [hi for _, hi in intervals]
    return grouped.sort_values(["release", "sample", "layer", "sae_id"], ignore_index=True)


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
        planted = truth["attention"][phase]
        for layer, heads in zip(planted.get("layers", range(n_layers)), planted["strength"]):
            rows.append(
                {
                    "phase": phase,
                    "layer": layer,
                    "depth": layer / max(n_layers - 1, 1),
                    "strength": float(np.mean(heads)),
                }
            )
    return pd.DataFrame(rows)


@dataclass
class TruthRecovery:
    """The measured values against the ground truth (planted releases, ``core.testbeds.truth``)."""

    output: Recovery
    semantic_auroc: float
    shapes: dict[str, str]  # phase -> planted shape
    power: pd.DataFrame  # core.analysis.power.power_table: detection of the planted features per strength bin
    hard_cases: pd.DataFrame  # core.analysis.power.hard_case_table (empty unless the release plants hard cases)
    class_recovery: pd.DataFrame  # core.analysis.power.class_recovery_table: precision / recall per class


@dataclass
class ReleaseResults:
    """Everything the report and the plots of one release show (features and control side by side)."""

    release: str
    architecture: str
    by_layer: pd.DataFrame  # output_fraction_by_layer, samples feature and control
    verdicts: pd.DataFrame  # core.analysis.verdicts.claim_verdicts
    thresholds: pd.DataFrame
    null_rate: float
    semantic_fraction: float
    missing_layers: list[int]
    coverage: pd.DataFrame  # sae_coverage: registered SAEs, analysed or missing
    truth: TruthRecovery | None = None
    profile: pd.DataFrame = field(default_factory=pd.DataFrame)  # core.analysis.profiles.depth_profile
    head_participation: pd.DataFrame = field(default_factory=pd.DataFrame)  # attention_participation rows
    per_feature: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per direction, samples feature/control
    null_rows: pd.DataFrame = field(default_factory=pd.DataFrame)  # semantic_null rows
    sensitivity: pd.DataFrame = field(default_factory=pd.DataFrame)  # c1_sensitivity rows (core.analysis.classify)
    agreement: pd.DataFrame = field(
        default_factory=pd.DataFrame
    )  # core.analysis.agreement.release_agreement (empty: no corpus)
    agreement_by_sae: pd.DataFrame = field(default_factory=pd.DataFrame)  # agreement_summary rows of its SAEs
    truth_strength: pd.DataFrame | None = None


KEYS = ["release", "sae_id", "layer", "feature"]


def per_feature_table(
    classes: pd.DataFrame, control: pd.DataFrame, norms: pd.DataFrame, feature_part: pd.DataFrame
) -> pd.DataFrame:
    """One row per (sample, sae_id, direction): the class columns, raw ``encoder_norm`` / ``decoder_norm``
    (the control's: the SAE's norms permuted) and the per-phase mean participation scores
    ``score_encoder_embedding`` / ``score_decoder_unembedding`` (NaN where the phase has no circuit)."""
    feats = classes.merge(norms[KEYS + ["encoder_norm", "decoder_norm"]], on=KEYS, how="left").assign(sample="feature")
    out = pd.concat([feats, control.assign(sample="control")], ignore_index=True)
    for phase in ("encoder_embedding", "decoder_unembedding"):
        out[f"score_{phase}"] = np.nan
    if len(feature_part):
        scores = feature_part.pivot_table(index=KEYS + ["sample"], columns="phase", values="mean_score")
        scores = scores.add_prefix("score_").reset_index()
        out = out.drop(columns=[c for c in scores.columns if c.startswith("score_")]).merge(
            scores, on=KEYS + ["sample"], how="left"
        )
    return out


def null_rate(null_rows: pd.DataFrame, classes: pd.DataFrame) -> float:
    """Fraction of the calibrating null's directions called output-predicting (the rule's false-positive rate)."""
    if null_rows.empty:
        return float("nan")
    if "null" not in classes or classes.empty:
        return float(null_rows["output_predicting"].mean())
    sample = NULLS[str(classes["null"].iloc[0])]
    return float(null_rows.loc[null_rows["sample"] == sample, "output_predicting"].mean())


def release_results(
    release: str,
    architecture: str,
    n_layers: int,
    classes: pd.DataFrame,
    control: pd.DataFrame,
    null_rows: pd.DataFrame,
    thresholds: pd.DataFrame,
    norms: pd.DataFrame,
    head_part: pd.DataFrame,
    feature_part: pd.DataFrame,
    sensitivity: pd.DataFrame,
    agreement: tuple[pd.DataFrame, pd.DataFrame] = (pd.DataFrame(), pd.DataFrame()),
    truth: dict | None = None,
    stored: dict[str, pd.DataFrame] | None = None,
    registered: Sequence[str] = (),
) -> ReleaseResults:
    """Every measured quantity and verdict of one release from its tables (each filtered to the release);
    ``agreement``: its SAEs' ``agreement_summary`` and ``activation_agreement`` rows (empty without a corpus);
    ``stored``: the ``RESULT_TABLES`` already computed for it (read back, not recomputed); ``registered``: the
    release's registered SAE ids (partitions), for ``sae_coverage``."""
    per_feature = per_feature_table(classes, control, norms, feature_part)
    if stored is None:
        stored = {
            "sae_coverage": coverage_table(release, registered, classes["sae_id"].unique()),
            "output_fraction_by_layer": output_fraction_by_layer(per_feature),
            "claim_verdicts": claim_verdicts(release, architecture, n_layers, per_feature, sensitivity),
            "depth_profiles": depth_profile(feature_part, n_layers) if len(feature_part) else pd.DataFrame(),
            "release_agreement": release_agreement(release, *agreement),
        }
    results = ReleaseResults(
        release=release,
        architecture=architecture,
        by_layer=stored["output_fraction_by_layer"],
        verdicts=stored["claim_verdicts"],
        thresholds=thresholds.groupby(["null", "side", "metric"], as_index=False).agg(
            threshold=("threshold", "median"),
            null_median=("null_median", "median"),
            quantile=("quantile", "first"),
            null_size=("null_size", "first"),
            saes=("threshold", "size"),
        ),
        null_rate=null_rate(null_rows, classes),
        semantic_fraction=float(classes["semantic"].mean()),
        missing_layers=sorted(set(range(n_layers)) - set(classes["layer"].astype(int))),
        coverage=stored["sae_coverage"],
        profile=stored["depth_profiles"],
        head_participation=head_part,
        per_feature=per_feature,
        null_rows=null_rows,
        sensitivity=sensitivity,
        agreement=stored["release_agreement"],
        agreement_by_sae=agreement[0],
    )
    if truth is not None:
        semantic = planted_semantic_features(truth)
        feats = per_feature[per_feature["sample"] == "feature"]
        labels = [int(f) in semantic.get(str(s), set()) for s, f in zip(feats["sae_id"], feats["feature"])]
        analysed = {**truth, "saes": {k: v for k, v in truth["saes"].items() if k in set(classes["sae_id"])}}
        results.truth = TruthRecovery(
            output=recovery(classes, semantic),
            semantic_auroc=auroc(feats["semantic_score"].to_numpy(), np.array(labels)) if any(labels) else float("nan"),
            shapes={p: truth["attention"][p]["shape"] for p in ("encoder_embedding", "decoder_unembedding")},
            power=power_table(classes, analysed).query("n > 0").reset_index(drop=True)
            if any(labels)
            else pd.DataFrame(),
            hard_cases=hard_case_table(classes, analysed) if "hard" in truth else pd.DataFrame(),
            class_recovery=class_recovery_table(classes, analysed),
        )
        results.truth_strength = planted_strength(truth, n_layers)
    return results


CLASS_TABLES = (
    "feature_classes",
    "control_classes",
    "semantic_null",
    "class_thresholds",
    "sae_features",
    "attention_participation",
    "feature_participation",
    "c1_sensitivity",
)
AGREEMENT_TABLES = ("agreement_summary", "activation_agreement")  # activation_agreement's, where a corpus exists
RESULT_TABLES = (
    "sae_coverage",
    "claim_verdicts",
    "output_fraction_by_layer",
    "depth_profiles",
    "release_agreement",
)  # what claim_statistics stores


def coverage_table(release: str, registered: Iterable[str], analysed: Iterable[str]) -> pd.DataFrame:
    """``sae_coverage``: one row per SAE of the release that is registered (a partition) or analysed, with
    ``status`` ``analysed`` (its class tables are stored) or ``missing`` (registered, nothing stored: never
    materialised, or failed before its first success). Release-level statistics use the analysed ones."""
    done = set(analysed)
    ids = sorted(done | set(registered))
    return pd.DataFrame(
        {"release": release, "sae_id": ids, "status": ["analysed" if sae_id in done else "missing" for sae_id in ids]}
    )


def missing_saes(coverage: pd.DataFrame) -> list[str]:
    """The SAE ids ``coverage_table`` marks missing."""
    return sorted(coverage.loc[coverage["status"] == "missing", "sae_id"]) if len(coverage) else []


def results_from_tables(
    release: Release,
    architecture: str,
    tables: dict[str, pd.DataFrame],
    truth: dict | None = None,
    computed: bool = False,
    registered: Sequence[str] = (),
) -> ReleaseResults:
    """``release_results`` of one release (``architecture``: its model's ``ModelGeometry.architecture``,
    ``core.weights.discovery.model_geometry``) from the stored ``CLASS_TABLES`` and ``AGREEMENT_TABLES`` (all releases,
    a missing table empty; filtered here); with
    ``computed``, the release's ``RESULT_TABLES`` are read from ``tables`` too instead of being computed;
    ``registered``: the release's registered SAE ids."""
    pick = {
        name: frame[frame["release"] == release.id].reset_index(drop=True) if len(frame) else frame
        for name, frame in tables.items()
    }
    return release_results(
        release.id,
        architecture,
        release.n_layers,
        pick["feature_classes"],
        pick["control_classes"],
        pick["semantic_null"],
        pick["class_thresholds"],
        pick["sae_features"],
        pick["attention_participation"],
        pick["feature_participation"],
        pick["c1_sensitivity"],
        (pick.get("agreement_summary", pd.DataFrame()), pick.get("activation_agreement", pd.DataFrame())),
        truth,
        {name: pick[name] for name in RESULT_TABLES} if computed else None,
        registered,
    )


def c1_sensitivity_summary(sensitivity: pd.DataFrame) -> str:
    """Markdown: pooled C1 fraction of features and control per rule, null, quantile and k."""
    if sensitivity.empty:
        return ""
    pooled = (
        sensitivity.groupby(["rule", "null", "quantile", "k", "sample"])[["hits", "n"]]
        .sum()
        .assign(fraction=lambda f: f["hits"] / f["n"])["fraction"]
        .unstack("sample")
        .reset_index()
    )
    return pooled.to_markdown(index=False, floatfmt=".3f")


def _fmt(x: float, spec: str = ".3f") -> str:
    return "–" if x is None or not np.isfinite(x) else format(x, spec)


def verdict_table(verdicts: pd.DataFrame) -> str:
    """The verdict rows as a markdown table: features and control side by side, verdict, rule."""
    lines = [
        "| claim | statistic | features | 95 % CI | control | p | n | verdict | rule |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in verdicts.itertuples():
        ci = f"{_fmt(r.ci_low)}–{_fmt(r.ci_high)}" if np.isfinite(r.ci_low) else "–"
        lines.append(
            f"| {r.claim} | {r.statistic} | {_fmt(r.value)} | {ci} | {_fmt(r.control_value)} | "
            f"{_fmt(r.p_value, '.3g')} | {r.n} | **{r.verdict}** | {r.rule} |"
        )
    return "\n".join(lines)


AGREEMENT_LABELS = {
    "output_overlap": "output lens top-k ∩ tokens its removal demotes most (fraction of k)",
    "input_overlap": "input lens top-k ∩ tokens it fires on most (fraction of k; corpus tokens only)",
    "output_score_auroc_for_output_predicting": "AUROC of the activation output score for the output-predicting class",
    "spearman_topk_z_output_score": "Spearman: weight score top-k z vs activation output score",
    "attention_auroc_for_decoder_participation": (
        "AUROC of the attention the next block pays where it fires, for the decoder-phase participation call"
    ),
    "spearman_decoder_participation_attention": (
        "Spearman: decoder-phase participation score vs attention paid where it fires"
    ),
    "output_coherence_auroc_for_semantic_output": (
        "AUROC of the coherence of the tokens its removal demotes most, for the semantic (output) call"
    ),
    "spearman_out_semantic_score_output_coherence": (
        "Spearman: output semantic score vs coherence of the tokens its removal demotes most"
    ),
    "input_coherence_auroc_for_semantic_input": (
        "AUROC of the coherence of the tokens it fires on most, for the semantic (input) call"
    ),
    "spearman_in_semantic_score_input_coherence": (
        "Spearman: input semantic score vs coherence of the tokens it fires on most"
    ),
}


def agreement_section(results: ReleaseResults) -> list[str]:
    """Markdown lines: the weight-based reading against the activations on the release's held-out corpus
    (``core.analysis.agreement``), pooled and per SAE, each beside its shuffled control; one line when not measured."""
    lines = ["## Activation agreement (weights vs the model run on held-out text)", ""]
    if results.agreement.empty:
        return lines + [
            "Not measured: the release provides no corpus, or `activation_agreement` has not been "
            "materialised for its SAEs.",
            "",
        ]
    pooled = results.agreement.assign(
        statistic=results.agreement["statistic"].map(AGREEMENT_LABELS).fillna(results.agreement["statistic"])
    )
    by_sae = results.agreement_by_sae.sort_values(["layer", "sae_id", "statistic"])
    disagree = pooled.loc[~pooled["beyond_chance"].astype(bool), "statistic"].tolist()
    plainly = (
        "Where the readings disagree (no agreement beyond chance): " + "; ".join(disagree) + "."
        if disagree
        else "Every reading below agrees with the activations beyond chance."
    )
    return lines + [
        plainly,
        "",
        "Control: the same statistic with another feature's lens list (overlaps) or permuted labels / scores "
        f"(AUROC, Spearman) — chance for this SAE and vocabulary. `beyond_chance`: one-sided p < {ALPHA} "
        "(overlaps: sign flips of per-feature differences; AUROC and Spearman: permutations, SAEs combined by "
        "Fisher's method).",
        "",
        pooled[["statistic", "value", "control", "p_value", "n", "saes", "beyond_chance"]].to_markdown(
            index=False, floatfmt=".3g"
        ),
        "",
        "Per SAE:",
        "",
        by_sae[["layer", "sae_id", "statistic", "value", "control", "p_value", "n"]].to_markdown(
            index=False, floatfmt=".3g"
        ),
        "",
    ]


def render_report(results: ReleaseResults, plots: dict[str, str]) -> str:
    """Markdown: the verdict table (features and control side by side, the rule of each verdict), the
    paper's statements, planted ground truth when known, per-claim detail with plots (``plots``: plot
    name -> file name beside the report), the thresholds and the method."""
    by_layer = results.by_layer
    feats = by_layer[by_layer["sample"] == "feature"]
    n = int(feats["n"].sum())
    missing = results.missing_layers
    not_analysed = missing_saes(results.coverage)
    counts = results.verdicts["verdict"].value_counts().reindex(VERDICTS, fill_value=0)
    lines = [
        f"# {results.release}: weight-only claims report",
        "",
        f"SAEs analysed: {len(feats)} (layers {', '.join(map(str, feats['layer'].tolist()))}); features: {n}; "
        f"semantic (either side): {results.semantic_fraction:.3f}. Every claim is measured for the features and "
        "for a control SAE of the same width (random directions with the SAE's own second moments); C2–C4 "
        "verdicts are about the difference."
        + (
            f" **Layers without an analysed SAE: {', '.join(map(str, missing))}** — layer-level statistics use the "
            "analysed layers only."
            if missing
            else ""
        )
        + (
            f" **Registered SAEs not analysed (never materialised or failed): {', '.join(not_analysed)}** — every "
            "statistic below is over the analysed SAEs only."
            if not_analysed
            else ""
        ),
        "",
        "## Verdicts",
        "",
        "Verdicts: " + ", ".join(f"{v} {c}" for v, c in counts.items()) + ".",
        "",
        verdict_table(results.verdicts),
        "",
        "| claim | paper (arXiv 2601.22447, abstract) |",
        "|---|---|",
        *[f"| {c} | {text} |" for c, text in PAPER.items()],
        "",
        f"Pre-registered C2 shapes ({results.architecture}): "
        + ", ".join(f"{p} {s}" for p, s in C2_HYPOTHESIS.get(results.architecture, {}).items())
        + ".",
        "",
    ]
    t = results.truth
    if t is not None:
        lines += [
            "## Planted ground truth beside the measured values",
            "",
            "| quantity | planted | measured |",
            "|---|---|---|",
            f"| output-predicting fraction | {t.output.truth_fraction:.3f} | {n and feats['hits'].sum() / n:.3f} "
            f"(precision {_fmt(t.output.precision)}, recall {_fmt(t.output.recall)}) |",
            "| semantic vs non-semantic separation | planted labels | "
            f"AUROC of semantic score {_fmt(t.semantic_auroc, '.4f')} |",
            *[
                f"| {phase} depth shape | {shape} | verdict: "
                f"{results.verdicts.set_index('claim')['verdict'].get(f'C2 {phase}', 'not measured')} |"
                for phase, shape in t.shapes.items()
            ],
            "",
        ]
        captioned = {
            "Precision and recall per class against the planted truth (semantic features expected in every class but "
            "token identity, hard features as their class expects, all others in none):": t.class_recovery,
            "Power: fraction of the planted output-predicting features called so, per planted direction-noise bin "
            "(95 % Wilson interval):": t.power,
            "Hard cases (planted to be misread; `holds` = the pipeline's calls match the expected outcome):": (
                t.hard_cases
            ),
        }
        for caption, table in captioned.items():
            if not table.empty:
                lines += [caption, "", table.to_markdown(index=False, floatfmt=".3f"), ""]
    plot = plots.get

    def image(name: str, alt: str) -> str:
        return f"![{alt}]({plot(name)})" if plot(name) else ""

    lines += [
        "## C1 by layer",
        "",
        image("output_fraction", "output-predicting fraction by layer"),
        "",
        by_layer[["sample", "layer", "sae_id", "n", "hits", "fraction", "ci_low", "ci_high"]].to_markdown(
            index=False, floatfmt=".3f"
        ),
        "",
        f"C1 band: {C1_BAND}. False-positive rate of the whole rule on the null that calibrated it (its "
        f"directions called output-predicting): {results.null_rate:.4f}.",
        "",
        "## C1 under other rules and nulls",
        "",
        "The verdict rows `C1 …` above: without token-identity features (a decoder that is one token's "
        "unembedding row and an encoder that reads the same token: the tied-embedding confound), with the "
        "isotropic null instead of the SAE-matched one, and the paper's P75 rule — true by construction (a "
        "quarter of any directions, the control's too), so never a verdict.",
        "",
        image("c1_sensitivity", "C1 sensitivity"),
        "",
        c1_sensitivity_summary(results.sensitivity),
        "",
        "## C2 depth profiles (null-z units; features and control; the verdict reads the P99)",
        "",
        image("depth_profiles", "depth profiles"),
        "",
        image("participation_heatmap", "layer × head participation"),
        "",
        results.profile[
            ["sample", "phase", "layer", "depth", "n", "mean", "p99", "p99_low", "p99_high", "participating"]
        ].to_markdown(index=False, floatfmt=".3f")
        if not results.profile.empty
        else "no attention statistics",
        "",
        "## C3 semantic vs non-semantic",
        "",
        image("semantic_violins", "semantic vs non-semantic"),
        "",
        *agreement_section(results),
        "## Calibration",
        "",
        image("calibration", "null vs observed"),
        "",
        "Thresholds used (median over the release's SAEs; each SAE is calibrated on its own null):",
        "",
        results.thresholds.to_markdown(index=False, floatfmt=".4g") if not results.thresholds.empty else "",
        "",
        "## Method (reconstructed: the paper's code is not public)",
        "",
        "- Output-predicting: top-k z-score of the output-lens logits above the null P99 AND semantic output "
        "tokens (core/analysis/classify.py); every threshold at the P99 of an SAE-matched null (Gaussian "
        "directions with the SAE's own second moments), the isotropic null beside it.",
        "- Semantic (per side): at least 2 of 3 coherence tests above their null P99, on the top-k normal token "
        "forms (special, unused, byte and whitespace tokens skipped, case/space variants merged: "
        "core/weights/vocab.py, core/analysis/semantic.py): Levenshtein, whitened embedding cosine, concentration "
        "(output: softmax entropy; input: top-k z, temperature-free).",
        "- Layer pairing: a resid_post(L) SAE's encoder direction is written by attention layer L (circuit "
        "ov_writer), its decoder direction read by layer L+1 (QK as query / key, OV write norm); the last "
        "layer's SAE has no reader (core/lens/circuits.py).",
        "- Participation score: per head the mean robust z (median / 1.4826·MAD) of the phase's circuit values "
        "against random unit directions through the same circuit — unitless, ~0 for noise, invariant to "
        "function-preserving rescalings (core/analysis/profiles.py).",
        "- Control: random directions with the SAE's joint encoder/decoder second moments, norms permuted "
        "(core/lens/control.py). Verdict rules: core/analysis/verdicts.py and the rule column above.",
        "",
    ]
    return "\n".join(lines)
