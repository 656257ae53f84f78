"""Interaction assets: weight-only circuits between SAE features and the vocabulary."""

import time

import dagster as dg
import pandas as pd

from assets.common import check_results, check_specs, sae_of, store_table
from core.circuits import VocabOperands, all_circuits, circuit_stats, input_lens
from core.discovery import fetch_model, fetch_sae
from core.engine import RowStats
from core.frames import SUMMARY_COLUMNS, circuit_frame, summary_frame, topk_frame, with_sae
from core.model_weights import TOKENIZER_FILE
from core.neuronpedia import dashboard_frame, raw_top_logits, write_json_export
from core.output_lens import null_directions, output_lens
from core.registry import SaeRef, get_release
from core.sae_formats import FORMATS
from core.table_checks import Check, combined, finite, ids_in_range, rows_match
from core.vocab import token_strings
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


def load(ref: SaeRef, hub: HubResource):
    """The SAE (checked against the model's width), the model checkpoint and its snapshot."""
    client = hub.client()
    snapshot, checkpoint = fetch_model(ref.release, client)
    sae_dir = fetch_sae(ref, client).path(ref.folder)
    sae = FORMATS[get_release(ref.release).format].read(sae_dir, d_model=checkpoint.geometry.d_model)
    return snapshot, checkpoint, sae


def stats_with_null(features: RowStats, null: RowStats) -> pd.DataFrame:
    """Summary rows of the features and of the null directions, told apart by ``sample``."""
    return pd.concat(
        [summary_frame(features).assign(sample="feature"), summary_frame(null).assign(sample="null")], ignore_index=True
    ).rename(columns={"row": "feature"})


@dg.asset(
    **INTERACTION_ASSET,
    check_specs=check_specs("lens_tables", LENS_CHECKS),
)
def lens_tables(
    context: dg.AssetExecutionContext, hub: HubResource, store: StoreResource, compute: ComputeResource
) -> dg.MaterializeResult:
    """Vocabulary lenses of every feature and of random unit directions (the null):

    - output (decoder–unembedding) lens, ``core.output_lens``: final RMSNorm gain folded, Gemma's final
      softcap applied — tables ``output_lens_tokens`` and ``output_lens_stats``;
    - input (encoder–embedding) lens, ``core.circuits.input_lens``: which token embeddings drive the
      feature's encoder — tables ``input_lens_tokens`` and ``input_lens_stats``.

    ``*_tokens``: ``sample`` 'feature' | 'null', ``feature`` (row index), ``side, rank, token_id, token,
    value`` (top/bottom-k). ``*_stats``: ``sample``, ``feature``, mean/std/median/p75, softmax
    max/entropy/top-k mass, ``top_mean``."""
    ref = sae_of(context)
    snapshot, checkpoint, sae = load(ref, hub)
    tokens = token_strings(snapshot.path(TOKENIZER_FILE), checkpoint.geometry.vocab_size)
    engine = dict(compute_dtype=compute.torch_dtype(), device=compute.resolved_device())
    settings = dict(k=compute.top_k, **engine)
    null = null_directions(compute.null_directions, sae.d_model, ref.key)
    metadata: dict[str, dg.MetadataValue] = {}
    parts: dict[str, list[Check]] = {name: [] for name in LENS_CHECKS}
    for lens, directions, compute_lens in (
        ("output", sae.decoder_directions(), output_lens),
        ("input", sae.encoder_directions(), input_lens),
    ):
        start = time.perf_counter()
        features = compute_lens(directions, checkpoint, **settings)
        null_stats = compute_lens(null, checkpoint, **settings)
        token_rows = pd.concat(
            [topk_frame(features, tokens).assign(sample="feature"), topk_frame(null_stats, tokens).assign(sample="null")],
            ignore_index=True,
        ).rename(columns={"row": "feature"})
        stats = stats_with_null(features, null_stats)
        metadata |= store_table(store, f"{lens}_lens_tokens", ref.key, with_sae(token_rows, ref))
        metadata |= store_table(store, f"{lens}_lens_stats", ref.key, with_sae(stats, ref))
        preview = token_rows[(token_rows["sample"] == "feature") & (token_rows.side == "top") & (token_rows.feature < 8)]
        metadata[f"{lens}_lens/top_tokens_preview"] = dg.MetadataValue.md(
            preview.groupby("feature")["token"].apply(lambda t: " · ".join(map(repr, t))).to_frame().to_markdown()
        )
        metadata[f"{lens}_lens/seconds"] = dg.MetadataValue.float(round(time.perf_counter() - start, 3))
        parts["one_row_per_feature_side_rank"].append(
            rows_match(lens, token_rows, (sae.d_sae + len(null)) * 2 * compute.top_k)
        )
        parts["values_finite"] += [finite(f"{lens} tokens", token_rows, ["value"]), finite(f"{lens} stats", stats, STAT_COLUMNS)]
        parts["token_ids_in_vocab"].append(ids_in_range(lens, token_rows, "token_id", checkpoint.geometry.vocab_size))
    dashboard = with_sae(dashboard_frame(raw_top_logits(sae.W_dec, checkpoint.unembedding(), **engine), tokens), ref)
    metadata |= store_table(store, "neuronpedia_top_logits", ref.key, dashboard)
    parts["one_row_per_feature_side_rank"].append(rows_match("neuronpedia", dashboard, sae.d_sae))
    parts["values_finite"].append(finite("neuronpedia", dashboard.explode(["pos_values", "neg_values"]), ["pos_values", "neg_values"]))
    metadata["neuronpedia_top_logits/json"] = dg.MetadataValue.path(
        str(write_json_export(dashboard, store.artifacts("exports") / "neuronpedia" / ref.release, ref.sae_id))
    )
    metadata |= {"device": dg.MetadataValue.text(settings["device"]), "dtype": dg.MetadataValue.text(compute.dtype)}
    checks = [combined(name, found) for name, found in parts.items()]
    return dg.MaterializeResult(metadata=metadata, check_results=check_results(checks))


@dg.asset(**INTERACTION_ASSET, check_specs=check_specs("circuit_tables", CIRCUIT_CHECKS))
def circuit_tables(
    context: dg.AssetExecutionContext, hub: HubResource, store: StoreResource, compute: ComputeResource
) -> dg.MaterializeResult:
    """Attention circuits of every feature with each query head of the SAE's layer (or every layer, by
    ``ComputeResource.circuit_layers``) (``core.circuits``): QK with
    the feature as query and as key, and OV, in both phases (encoder direction × embeddings,
    decoder direction × unembeddings), and the same for random unit directions (the null).

    Table ``circuit_stats``: ``sample, feature, phase, kind, attn_layer, head, kv_head``, pre-softmax
    mean/std/median/p75/top_mean, post-softmax softmax_max/softmax_entropy/topk_mass (softmax over the
    vocabulary), ``top_ids``/``top_values`` (lists, k each)."""
    ref = sae_of(context)
    _, checkpoint, sae = load(ref, hub)
    directions = {"encoder_embedding": sae.encoder_directions(), "decoder_unembedding": sae.decoder_directions()}
    null = null_directions(compute.circuit_null_directions, sae.d_model, ref.key)
    operands = VocabOperands(checkpoint, device=compute.resolved_device())
    circuits = all_circuits(checkpoint.geometry, compute.attention_layers(ref.layer, checkpoint.geometry.n_layers))
    frames, start = [], time.perf_counter()
    for i, circuit in enumerate(circuits, 1):
        for sample, vectors in (("feature", directions[circuit.phase]), ("null", null)):
            stats = circuit_stats(vectors, circuit, operands, k=compute.top_k, compute_dtype=compute.torch_dtype())
            frames.append(circuit_frame(stats, circuit, checkpoint.geometry).assign(sample=sample))
        if i % 24 == 0:
            context.log.info(f"circuits {ref.key}: {i}/{len(circuits)}")
    table = pd.concat(frames, ignore_index=True)
    checks = [
        rows_match(CIRCUIT_CHECKS[0], table, (sae.d_sae + len(null)) * len(circuits)),
        finite(CIRCUIT_CHECKS[1], table, STAT_COLUMNS),
    ]
    metadata = store_table(store, "circuit_stats", ref.key, with_sae(table, ref))
    metadata |= {
        "circuits": dg.MetadataValue.int(len(circuits)),
        "seconds": dg.MetadataValue.float(round(time.perf_counter() - start, 3)),
        "device": dg.MetadataValue.text(compute.resolved_device()),
    }
    return dg.MaterializeResult(metadata=metadata, check_results=check_results(checks))
