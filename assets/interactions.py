"""Interaction assets: weight-only circuits between SAE features and the vocabulary."""

import time

import dagster as dg

from assets.common import check_results, check_specs, sae_of, store_table, stored_table_metadata
from core.discovery import load_sae
from core.frames import SUMMARY_COLUMNS, with_sae
from core.model_weights import TOKENIZER_FILE
from core.neuronpedia import (
    NeuronpediaSource,
    dashboard_frame,
    dashboard_tokens,
    dashboard_top_logits,
    write_json_export,
)
from core.registry import get_release
from core.semantic import CANDIDATES
from core.stages import LENS_SIDES, circuit_stage, lens_stage
from core.table_checks import Check, RowTally, combined, finite, ids_in_range, rows_match
from core.vocab import vocabulary_table
from orchestration.partitions import sae_partitions
from orchestration.resources import ComputeResource, HubResource, StoreResource

INTERACTION_ASSET = dict(
    partitions_def=sae_partitions,
    group_name="interactions",
    deps=["sae_weights", "model_weights"],
    pool="compute",
    kinds={"pytorch", "parquet"},
)


LENS_CHECKS = ["one_row_per_feature_side_rank", "values_finite", "token_ids_in_vocab"]
CIRCUIT_CHECKS = ["one_row_per_direction_and_circuit", "values_finite"]
STAT_COLUMNS = [*SUMMARY_COLUMNS, "top_mean"]


@dg.asset(
    **INTERACTION_ASSET,
    check_specs=check_specs("lens_tables", LENS_CHECKS),
)
def lens_tables(
    context: dg.AssetExecutionContext, hub: HubResource, store: StoreResource, compute: ComputeResource
) -> dg.MaterializeResult:
    """Vocabulary lenses (``core.stages.lens_stage``) of every feature, of the control SAE (``core.control``)
    and of random unit directions (the null):

    - output (decoder–unembedding) lens, ``core.output_lens``: final RMSNorm gain folded, Gemma's final
      softcap applied — tables ``output_lens_tokens`` and ``output_lens_stats``;
    - input (encoder–embedding) lens, ``core.circuits.input_lens``: which token embeddings drive the
      feature's encoder — tables ``input_lens_tokens`` and ``input_lens_stats``.

    ``*_tokens``: ``sample`` 'feature' | 'control' | 'null' | 'matched_null', ``feature`` (row index), ``side, rank,
    token_id, token, value`` (top: the ``core.semantic.CANDIDATES`` best, bottom: top_k). ``*_stats``: ``sample``,
    ``feature``, mean/std/median/p75, softmax max/entropy/top-k mass (over the candidates), ``top_mean`` (top_k),
    ``top1_cosine``. ``vocabulary``: ``token_id, token, token_class`` (``core.vocab``) of the model's
    tokenizer. ``neuronpedia_top_logits`` and the Neuronpedia batch JSON: top/bottom logits in SAEDashboard's
    convention (``core.neuronpedia``)."""
    ref = sae_of(context)
    snapshot, checkpoint, sae = load_sae(ref, hub.client())
    vocabulary = vocabulary_table(snapshot.path(TOKENIZER_FILE), checkpoint.geometry.vocab_size)
    tokens = vocabulary["token"].tolist()
    engine = compute.engine()
    start = time.perf_counter()
    tables = lens_stage(sae, checkpoint, tokens, ref.key, compute.null_directions, engine)
    metadata: dict[str, dg.MetadataValue] = {
        "lens/seconds": dg.MetadataValue.float(round(time.perf_counter() - start, 3))
    }
    metadata |= store_table(store, "vocabulary", ref.key, with_sae(vocabulary, ref))
    metadata["vocabulary/token_classes"] = dg.MetadataValue.json(vocabulary["token_class"].value_counts().to_dict())
    parts: dict[str, list[Check]] = {name: [] for name in LENS_CHECKS}
    for lens in LENS_SIDES:
        token_rows, stats = tables[f"{lens}_lens_tokens"], tables[f"{lens}_lens_stats"]
        metadata |= store_table(store, f"{lens}_lens_tokens", ref.key, with_sae(token_rows, ref))
        metadata |= store_table(store, f"{lens}_lens_stats", ref.key, with_sae(stats, ref))
        preview = token_rows[
            (token_rows["sample"] == "feature") & (token_rows.side == "top") & (token_rows.feature < 8)
        ]
        metadata[f"{lens}_lens/top_tokens_preview"] = dg.MetadataValue.md(
            preview.groupby("feature")["token"].apply(lambda t: " · ".join(map(repr, t))).to_frame().to_markdown()
        )
        parts["one_row_per_feature_side_rank"].append(
            rows_match(
                lens,
                token_rows,
                2
                * (sae.d_sae + compute.null_directions)
                * (min(CANDIDATES, checkpoint.geometry.vocab_size) + compute.top_k),
            )
        )
        parts["values_finite"] += [
            finite(f"{lens} tokens", token_rows, ["value"]),
            finite(f"{lens} stats", stats, STAT_COLUMNS),
        ]
        parts["token_ids_in_vocab"].append(ids_in_range(lens, token_rows, "token_id", checkpoint.geometry.vocab_size))
    dashboard_vocab = dashboard_tokens(snapshot.path(TOKENIZER_FILE), checkpoint.geometry.vocab_size)
    dashboard = with_sae(dashboard_frame(dashboard_top_logits(sae, checkpoint, engine.device), dashboard_vocab), ref)
    metadata |= store_table(store, "neuronpedia_top_logits", ref.key, dashboard)
    parts["one_row_per_feature_side_rank"].append(rows_match("neuronpedia", dashboard, sae.d_sae))
    parts["values_finite"].append(
        finite("neuronpedia", dashboard.explode(["pos_values", "neg_values"]), ["pos_values", "neg_values"])
    )
    source = NeuronpediaSource.of(ref, get_release(ref.release))
    metadata["neuronpedia_top_logits/json"] = dg.MetadataValue.path(
        str(write_json_export(dashboard, source, store.artifacts("exports") / "neuronpedia" / ref.release, ref.sae_id))
    )
    metadata["neuronpedia_top_logits/neuronpedia_id"] = dg.MetadataValue.text(
        ref.neuronpedia or f"none in the registry: SAEDashboard defaults {source}"
    )
    metadata |= {"device": dg.MetadataValue.text(engine.device), "dtype": dg.MetadataValue.text(compute.dtype)}
    checks = [combined(name, found) for name, found in parts.items()]
    return dg.MaterializeResult(metadata=metadata, check_results=check_results(checks))


@dg.asset(**INTERACTION_ASSET, check_specs=check_specs("circuit_tables", CIRCUIT_CHECKS))
def circuit_tables(
    context: dg.AssetExecutionContext, hub: HubResource, store: StoreResource, compute: ComputeResource
) -> dg.MaterializeResult:
    """Attention circuits (``core.stages.circuit_stage``, ``core.circuits``) of the features, the control
    and random unit directions (the null), at the layers paired with the SAE's hook
    (``ComputeResource.circuit_layers``): the encoder–embedding writer circuit ``ov_writer`` at layer L,
    the decoder–unembedding QK (feature as query / as key) and OV circuits at reader layer L+1.

    Tables ``circuit_stats``: ``sample, feature, phase, kind, attn_layer, head, kv_head``, pre-softmax
    mean/std/median/p75/top_mean, post-softmax softmax_max/softmax_entropy/topk_mass (softmax over the
    vocabulary), ``top_ids``/``top_values`` (lists, k each); ``head_writes``: ``sample, feature, phase, kind
    ('ov_write_norm'), attn_layer, head, value`` (‖W_O W_V n(d)‖ at the reader layers)."""
    ref = sae_of(context)
    _, checkpoint, sae = load_sae(ref, hub.client())
    start = time.perf_counter()
    n_null = compute.circuit_null_directions

    def progress(i: int, n: int) -> None:
        if i % 24 == 0:
            context.log.info(f"circuits {ref.key}: {i}/{n}")

    tally = RowTally(STAT_COLUMNS)
    with store.tables().appender("circuit_stats", ref.key) as append:  # each circuit's rows to disk as they come
        out = circuit_stage(
            sae,
            checkpoint,
            ref.key,
            ref.layer,
            n_null,
            compute.engine(),
            compute.circuit_layers,
            compute.circuit_set,
            progress,
            sink=lambda rows: append(tally.add(with_sae(rows, ref))),
        )
    checks = [
        tally.rows_match(CIRCUIT_CHECKS[0], (2 * sae.d_sae + n_null) * out.n_circuits),
        tally.finite(CIRCUIT_CHECKS[1]),
    ]
    metadata = stored_table_metadata(store, "circuit_stats", store.tables().file("circuit_stats", ref.key), tally.rows)
    metadata |= store_table(store, "head_writes", ref.key, with_sae(out.head_writes, ref))
    metadata |= {
        "circuits": dg.MetadataValue.int(out.n_circuits),
        "seconds": dg.MetadataValue.float(round(time.perf_counter() - start, 3)),
        "device": dg.MetadataValue.text(compute.resolved_device()),
        "dtype": dg.MetadataValue.text(compute.dtype),
    }
    return dg.MaterializeResult(metadata=metadata, check_results=check_results(checks))
