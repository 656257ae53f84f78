"""Feature-classification assets: semantic / output-predicting classes and attention participation."""

import dagster as dg

from assets.common import check_results, check_specs, sae_of, store_table
from assets.interactions import load
from core.control import control_sae
from core.frames import with_sae
from core.semantic import METRICS
from core.stages import class_stage
from core.statistics import DEFAULT_QUANTILE, wilson_interval
from core.table_checks import combined, finite, rows_match
from orchestration.partitions import sae_partitions
from orchestration.resources import ComputeResource, HubResource, StoreResource


CLASS_CHECKS = ["one_row_per_feature", "scores_finite", "thresholds_recorded"]
# every calibrated statistic: the output top-k z-score and the three coherence metrics of each side
LENS_TABLES = ("output_lens_tokens", "output_lens_stats", "input_lens_tokens", "input_lens_stats")
SCORE_COLUMNS = ["topk_z", *(f"{side}_{m}" for side in ("out", "in") for m in METRICS)]


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
    ``core.semantic``, ``core.profiles``), every threshold calibrated at the null's P99 (random unit
    directions through the same lens / circuit); reads the stored lens and circuit tables only.

    Tables:
    - ``feature_classes``: ``feature, topk_z, heavy_tailed, out_/in_{levenshtein, cosine, concentration,
      n_passes, semantic_score}, semantic_output, semantic_input, semantic, semantic_score,
      output_predicting`` (= heavy-tailed AND semantic output tokens), ``threshold, null_quantile, null_size``;
    - ``control_classes``: the same columns for the control SAE (``core.control``), plus its
      ``encoder_norm`` / ``decoder_norm`` (the SAE's norms in a seeded random order);
    - ``semantic_null``: the same columns for the null directions (the calibration sample);
    - ``class_thresholds``: ``side, metric, threshold, null_median, quantile, null_size``;
    - ``null_quantiles``: ``side, metric, q, value`` (the null distributions);
    - ``attention_participation``: ``sample, feature, phase, attn_layer, head, score`` (mean null-z of the
      phase's circuits), ``topk_mass, threshold, participates`` (features and control; the null's
      false-positive rate in the metadata);
    - ``feature_participation``: ``sample, feature, phase, mean_score, max_score, mean_topk_mass,
      heads_participating, participates``."""
    ref = sae_of(context)
    tables = store.tables()
    _, checkpoint, sae = load(ref, hub)
    lens = {name: tables.read(name, ref.key) for name in LENS_TABLES}
    out = class_stage(lens, tables.read("circuit_stats", ref.key), tables.read("head_writes", ref.key),
                      checkpoint.embedding().numpy(), checkpoint.unembedding().numpy(), DEFAULT_QUANTILE)
    classes, part, per_feature = out.classes, out.participation, out.feature_participation
    control = control_sae(sae, ref.key)
    features = out.rows("feature")
    control_rows = out.rows("control").assign(encoder_norm=control.encoder_norm.numpy(),
                                              decoder_norm=control.decoder_norm.numpy())
    null_rows = out.rows("null")
    metadata = store_table(store, "feature_classes", ref.key, with_sae(features, ref))
    metadata |= store_table(store, "control_classes", ref.key, with_sae(control_rows, ref))
    metadata |= store_table(store, "semantic_null", ref.key, with_sae(null_rows, ref))
    metadata |= store_table(store, "class_thresholds", ref.key, with_sae(classes.thresholds, ref))
    metadata |= store_table(store, "null_quantiles", ref.key, with_sae(classes.null_quantiles, ref))
    feats_part = part[part["sample"] != "null"].reset_index(drop=True)
    metadata |= store_table(store, "attention_participation", ref.key, feats_part)
    metadata |= store_table(store, "feature_participation", ref.key, per_feature)

    n, hits = len(features), int(features.output_predicting.sum())
    low, high = wilson_interval(hits, n)
    null_part = part[part["sample"] == "null"].groupby("phase")["participates"].mean()
    metadata |= {
        "output_predicting_fraction": dg.MetadataValue.float(hits / n),
        "control_output_predicting_fraction": dg.MetadataValue.float(float(control_rows.output_predicting.mean())),
        "fraction_ci95": dg.MetadataValue.text(f"[{low:.3f}, {high:.3f}]"),
        "semantic_fraction": dg.MetadataValue.float(float(features.semantic.mean())),
        "null_output_predicting_rate": dg.MetadataValue.float(classes.null_rate),
        "null_participation_rate": dg.MetadataValue.text(", ".join(f"{k}: {v:.4f}" for k, v in null_part.items())),
        "thresholds": dg.MetadataValue.md(classes.thresholds.to_markdown(index=False, floatfmt=".4g")),
    }
    checks = [
        combined("one_row_per_feature", [rows_match("feature_classes", features, sae.d_sae),
                                         rows_match("control_classes", control_rows, sae.d_sae),
                                         rows_match("feature_participation", per_feature,
                                                    2 * sae.d_sae * per_feature["phase"].nunique())]),
        combined("scores_finite", [finite("feature_classes", features, SCORE_COLUMNS),
                                   finite("attention_participation", feats_part, ["score"])]),
        combined("thresholds_recorded", [rows_match("class_thresholds", classes.thresholds, len(SCORE_COLUMNS)),
                                         finite("class_thresholds", classes.thresholds, ["threshold"]),
                                         finite("participation thresholds", feats_part, ["threshold"])]),
    ]
    return dg.MaterializeResult(metadata=metadata, check_results=check_results(checks))
