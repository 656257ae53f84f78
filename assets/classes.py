"""Feature-classification assets: semantic / output-predicting classes and attention participation."""

import dagster as dg
import numpy as np

from assets.common import check_results, check_specs, sae_of, store_table
from core.classify import NULLS, SIDES
from core.control import control_sae
from core.discovery import load_sae
from core.feature_browser import write_browser
from core.frames import with_sae
from core.model_weights import ModelCheckpoint
from core.stages import class_stage
from core.statistics import DEFAULT_QUANTILE, wilson_interval
from core.table_checks import combined, finite, rows_match
from core.vocab import normal_tokens
from orchestration.partitions import sae_partitions
from orchestration.resources import ComputeResource, HubResource, StoreResource

CLASS_CHECKS = ["one_row_per_feature", "scores_finite", "thresholds_recorded"]
LENS_TABLES = ("output_lens_tokens", "output_lens_stats", "input_lens_tokens", "input_lens_stats")
# defined for every direction: the coherence metrics are NaN where a direction's candidates hold fewer than k
# normal forms (a feature pointing at <unusedN> or byte tokens) — that is a finding, not a defect
SCORE_COLUMNS = ["topk_z"]
CALIBRATED = 7  # thresholds per null: top-k z + three coherence metrics per side (+ Levenshtein's string null per side)


def vocab_matrices(checkpoint: ModelCheckpoint) -> tuple[np.ndarray, np.ndarray]:
    """(W_E, W_U) as float32 arrays, (vocab, d_model): two views of one buffer for a tied model. The embedding
    tensor is held while the unembedding is asked for, so the checkpoint hands back that same tensor instead of
    reading a second copy (an array from ``Tensor.numpy()`` keeps the buffer, not the tensor object)."""
    embedding = checkpoint.embedding()
    return embedding.numpy(), checkpoint.unembedding().numpy()


@dg.asset(
    partitions_def=sae_partitions,
    group_name="classes",
    deps=["lens_tables", "circuit_tables"],
    kinds={"parquet"},
    check_specs=check_specs("feature_classes", CLASS_CHECKS),
)
def feature_classes(
    context: dg.AssetExecutionContext, hub: HubResource, store: StoreResource, compute: ComputeResource
) -> dg.MaterializeResult:
    """Feature classes of one SAE and of its control (``core.stages.class_stage``: ``core.classify``,
    ``core.semantic``, ``core.profiles``), every threshold calibrated at the null's P99 — the SAE-matched null
    by default (``core.control.matched_null``), the isotropic one for the record; reads the stored lens,
    vocabulary and circuit tables only.

    Tables:
    - ``feature_classes``: ``feature, topk_z, heavy_tailed, {out,in}_{levenshtein, cosine, concentration,
      n_excluded, n_collapsed, n_passes, semantic_score}, semantic_output, semantic_input, semantic,
      semantic_score, output_predicting`` (= heavy-tailed AND semantic output tokens), ``out_top_forms,
      in_top_forms`` (the normal forms tested), ``token_jaccard, top1_share, token_identity``,
      ``out_whitening_components, in_whitening_components`` (principal components the cosine removed), ``threshold,
      null_quantile, null_size, null, rule, k``;
    - ``control_classes``: the same columns for the control SAE (``core.control``), plus its
      ``encoder_norm`` / ``decoder_norm`` (the SAE's norms in a seeded random order);
    - ``semantic_null``: the same columns for both nulls' directions (``sample`` null | matched_null);
    - ``class_thresholds``: ``side, metric, threshold, null_median, quantile, null_size, null`` (matched |
      isotropic | string_permutation: Levenshtein only), ``rule, k``;
    - ``null_quantiles``: ``side, metric, q, value, null`` (the null distributions);
    - ``c1_sensitivity``: ``rule, null, quantile, k, sample, n, hits, fraction``, and the same without
      token-identity features (``core.classify.c1_sensitivity``);
    - ``attention_participation``: ``sample, feature, phase, attn_layer, head, score`` (mean null-z of the
      phase's circuits), ``topk_mass, threshold, participates`` (features and control; the null's
      false-positive rate in the metadata);
    - ``feature_participation``: ``sample, feature, phase, mean_score, max_score, mean_topk_mass,
      heads_participating, participates``.

    And the feature browser ``<data>/browser/<release>/<sae_id>.html`` (``core.feature_browser``, path in the
    ``feature_browser`` metadata): every feature's top output and input tokens and classes, searchable."""
    ref = sae_of(context)
    tables = store.tables()
    _, checkpoint, sae = load_sae(ref, hub.client())
    lens = {name: tables.read(name, ref.key) for name in LENS_TABLES}
    normal = normal_tokens(tables.read("vocabulary", ref.key))
    out = class_stage(
        lens,
        tables.read("circuit_stats", ref.key),
        tables.read("head_writes", ref.key),
        normal,
        *vocab_matrices(checkpoint),
        DEFAULT_QUANTILE,
        compute.top_k,
    )
    classes, part, per_feature = out.classes, out.participation, out.feature_participation
    control = control_sae(sae, ref.key)
    features = out.rows("feature")
    control_rows = out.rows("control").assign(
        encoder_norm=control.encoder_norm.numpy(), decoder_norm=control.decoder_norm.numpy()
    )
    null_rows = classes.rows[classes.rows["sample"].isin(list(NULLS.values()))].reset_index(drop=True)
    metadata = store_table(store, "feature_classes", ref.key, with_sae(features, ref))
    metadata |= store_table(store, "control_classes", ref.key, with_sae(control_rows, ref))
    metadata |= store_table(store, "semantic_null", ref.key, with_sae(null_rows, ref))
    metadata |= store_table(store, "class_thresholds", ref.key, with_sae(classes.thresholds, ref))
    metadata |= store_table(store, "null_quantiles", ref.key, with_sae(classes.null_quantiles, ref))
    metadata |= store_table(store, "c1_sensitivity", ref.key, with_sae(classes.sensitivity, ref))
    feats_part = part[part["sample"] != "null"].reset_index(drop=True)
    metadata |= store_table(store, "attention_participation", ref.key, feats_part)
    metadata |= store_table(store, "feature_participation", ref.key, per_feature)
    browser = write_browser(
        store.artifacts("browser"), ref, lens["output_lens_tokens"], lens["input_lens_tokens"], features
    )
    metadata["feature_browser"] = dg.MetadataValue.path(str(browser))  # every feature's tokens, searchable

    n, hits = len(features), int(features.output_predicting.sum())
    low, high = wilson_interval(hits, n)
    null_part = part[part["sample"] == "null"].groupby("phase")["participates"].mean()
    metadata |= {
        "output_predicting_fraction": dg.MetadataValue.float(hits / n),
        "control_output_predicting_fraction": dg.MetadataValue.float(float(control_rows.output_predicting.mean())),
        "fraction_ci95": dg.MetadataValue.text(f"[{low:.3f}, {high:.3f}]"),
        "semantic_fraction": dg.MetadataValue.float(float(features.semantic.mean())),
        "token_identity_fraction": dg.MetadataValue.float(float(features.token_identity.mean())),
        **{f"null_output_predicting_rate/{name}": dg.MetadataValue.float(classes.null_rate(name)) for name in NULLS},
        "whitening_components": dg.MetadataValue.json(classes.whitening_components),
        "null_participation_rate": dg.MetadataValue.text(", ".join(f"{k}: {v:.4f}" for k, v in null_part.items())),
        "thresholds": dg.MetadataValue.md(classes.thresholds.to_markdown(index=False, floatfmt=".4g")),
    }
    checks = [
        combined(
            "one_row_per_feature",
            [
                rows_match("feature_classes", features, sae.d_sae),
                rows_match("control_classes", control_rows, sae.d_sae),
                rows_match("feature_participation", per_feature, 2 * sae.d_sae * per_feature["phase"].nunique()),
            ],
        ),
        combined(
            "scores_finite",
            [
                finite("feature_classes", features, SCORE_COLUMNS),
                finite("attention_participation", feats_part, ["score"]),
            ],
        ),
        combined(
            "thresholds_recorded",
            [
                rows_match("class_thresholds", classes.thresholds, CALIBRATED * len(NULLS) + len(SIDES)),
                finite("class_thresholds", classes.thresholds, ["threshold"]),
                finite("participation thresholds", feats_part, ["threshold"]),
            ],
        ),
    ]
    return dg.MaterializeResult(metadata=metadata, check_results=check_results(checks))
