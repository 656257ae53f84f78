"""Feature-classification assets: semantic / output-predicting classes and attention participation."""

import dagster as dg
import pandas as pd

from assets.common import check_results, check_specs, sae_of, store_table
from assets.interactions import load
from core.classify import DEFAULT_QUANTILE, classify_features
from core.frames import with_sae
from core.output_lens import null_directions
from core.profiles import PHASES, circuit_values, feature_participation, ov_write_frame, participation
from core.semantic import METRICS
from core.table_checks import combined, finite, rows_match
from core.statistics import wilson_interval
from orchestration.partitions import sae_partitions
from orchestration.resources import ComputeResource, HubResource, StoreResource


CLASS_CHECKS = ["one_row_per_feature", "scores_finite", "thresholds_recorded"]
# every calibrated statistic: the output top-k z-score and the three coherence metrics of each side
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
    """Feature classes of one SAE (``core.classify``, ``core.semantic``, ``core.profiles``), every threshold
    calibrated at the null's P99 (random unit directions through the same lens / circuit).

    Tables:
    - ``feature_classes``: ``feature, topk_z, heavy_tailed, out_/in_{levenshtein, cosine, concentration,
      n_passes, semantic_score}, semantic_output, semantic_input, semantic, semantic_score,
      output_predicting`` (= heavy-tailed AND semantic output tokens), ``threshold, null_quantile, null_size``;
    - ``semantic_null``: the same columns for the null directions (the calibration sample);
    - ``class_thresholds``: ``side, metric, threshold, null_median, quantile, null_size``;
    - ``null_quantiles``: ``side, metric, q, value`` (the null distributions);
    - ``attention_participation``: ``feature, phase, attn_layer, head, score, topk_mass, threshold,
      participates`` (features; null false-positive rate in the metadata);
    - ``feature_participation``: ``feature, phase, mean_score, max_score, mean_topk_mass,
      heads_participating, participates``."""
    ref = sae_of(context)
    tables = store.tables()
    _, checkpoint, sae = load(ref, hub)
    embedding, unembedding = checkpoint.embedding(), checkpoint.unembedding()
    classes = classify_features(
        tables.read("output_lens_tokens", ref.key), tables.read("output_lens_stats", ref.key),
        tables.read("input_lens_tokens", ref.key), tables.read("input_lens_stats", ref.key),
        unembedding.numpy(), embedding.numpy(), DEFAULT_QUANTILE,
    )
    null = null_directions(compute.circuit_null_directions, sae.d_model, ref.key)
    writes = pd.concat(
        [
            ov_write_frame(sae.decoder_directions(), null, checkpoint.attention(layer), checkpoint.geometry, layer)
            for layer in compute.attention_layers(ref.layer, checkpoint.geometry.n_layers)
        ],
        ignore_index=True,
    )
    circuits = tables.read("circuit_stats", ref.key)
    part = participation(circuit_values(circuits, with_sae(writes, ref)), DEFAULT_QUANTILE)
    per_feature = feature_participation(part)

    features = classes.features
    null_rows = classes.rows[classes.rows["sample"] == "null"].drop(columns="sample")
    metadata = store_table(store, "feature_classes", ref.key, with_sae(features, ref))
    metadata |= store_table(store, "semantic_null", ref.key, with_sae(null_rows, ref))
    metadata |= store_table(store, "class_thresholds", ref.key, with_sae(classes.thresholds, ref))
    metadata |= store_table(store, "null_quantiles", ref.key, with_sae(classes.null_quantiles, ref))
    feats_part = part[part["sample"] == "feature"].drop(columns="sample")
    metadata |= store_table(store, "attention_participation", ref.key, feats_part.reset_index(drop=True))
    metadata |= store_table(store, "feature_participation", ref.key, per_feature)

    n, hits = len(features), int(features.output_predicting.sum())
    low, high = wilson_interval(hits, n)
    null_part = part[part["sample"] == "null"].groupby("phase")["participates"].mean()
    metadata |= {
        "output_predicting_fraction": dg.MetadataValue.float(hits / n),
        "fraction_ci95": dg.MetadataValue.text(f"[{low:.3f}, {high:.3f}]"),
        "semantic_fraction": dg.MetadataValue.float(float(features.semantic.mean())),
        "null_output_predicting_rate": dg.MetadataValue.float(classes.null_rate),
        "null_participation_rate": dg.MetadataValue.text(", ".join(f"{k}: {v:.4f}" for k, v in null_part.items())),
        "thresholds": dg.MetadataValue.md(classes.thresholds.to_markdown(index=False, floatfmt=".4g")),
    }
    checks = [
        combined("one_row_per_feature", [rows_match("feature_classes", features, sae.d_sae),
                                         rows_match("feature_participation", per_feature, sae.d_sae * len(PHASES))]),
        combined("scores_finite", [finite("feature_classes", features, SCORE_COLUMNS),
                                   finite("attention_participation", feats_part, ["score"])]),
        combined("thresholds_recorded", [rows_match("class_thresholds", classes.thresholds, len(SCORE_COLUMNS)),
                                         finite("class_thresholds", classes.thresholds, ["threshold"]),
                                         finite("participation thresholds", feats_part, ["threshold"])]),
    ]
    return dg.MaterializeResult(metadata=metadata, check_results=check_results(checks))
