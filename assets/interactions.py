"""Interaction assets: weight-only circuits between SAE features and the vocabulary."""

import time

import dagster as dg
import pandas as pd

from assets.common import sae_of, store_table
from core.discovery import fetch_model, fetch_sae
from core.frames import summary_frame, topk_frame, with_sae
from core.model_weights import TOKENIZER_FILE
from core.output_lens import null_directions, output_lens
from core.registry import get_release
from core.sae_formats import FORMATS
from core.vocab import token_strings
from orchestration.partitions import sae_partitions
from orchestration.resources import ComputeResource, HubResource, StoreResource


@dg.asset(
    partitions_def=sae_partitions,
    group_name="interactions",
    deps=["sae_weights", "model_weights"],
    pool="compute",
    kinds={"pytorch", "parquet"},
)
def output_lens_tables(
    context: dg.AssetExecutionContext,
    hub: HubResource,
    store: StoreResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    """Decoder–unembedding lens of every feature (``core.output_lens``: final RMSNorm gain folded,
    Gemma's final softcap applied), plus the same lens on random unit directions as the null.

    Tables: ``output_lens_tokens`` (``feature, side, rank, token_id, token, value``: top/bottom-k tokens
    and their logits) and ``output_lens_stats`` (``kind`` 'feature' | 'null', ``feature`` = row index,
    mean/std/median/p75 of the logits, softmax max/entropy/top-k mass, ``top_mean``)."""
    ref = sae_of(context)
    release = get_release(ref.release)
    client = hub.client()
    snapshot, checkpoint = fetch_model(ref.release, client)
    sae_dir = fetch_sae(ref, client).path(ref.folder)
    sae = FORMATS[release.format].read(sae_dir, d_model=checkpoint.geometry.d_model)
    tokens = token_strings(snapshot.path(TOKENIZER_FILE), checkpoint.geometry.vocab_size)

    def progress(done: int, total: int) -> None:
        context.log.info(f"output lens {ref.key}: {done}/{total} directions")

    settings = dict(k=compute.top_k, compute_dtype=compute.torch_dtype(), device=compute.resolved_device())
    start = time.perf_counter()
    features = output_lens(sae.decoder_directions(), checkpoint, progress=progress, **settings)
    null = output_lens(null_directions(compute.null_directions, sae.d_model, ref.key), checkpoint, **settings)
    seconds = time.perf_counter() - start

    token_rows = topk_frame(features, tokens).rename(columns={"row": "feature"})
    stats = pd.concat(
        [summary_frame(features).assign(kind="feature"), summary_frame(null).assign(kind="null")], ignore_index=True
    ).rename(columns={"row": "feature"})
    metadata = store_table(store, "output_lens_tokens", ref.key, with_sae(token_rows, ref))
    metadata |= store_table(store, "output_lens_stats", ref.key, with_sae(stats, ref))
    preview = token_rows[(token_rows.side == "top") & (token_rows.feature < 8)]
    metadata |= {
        "seconds": dg.MetadataValue.float(round(seconds, 3)),
        "device": dg.MetadataValue.text(settings["device"]),
        "dtype": dg.MetadataValue.text(compute.dtype),
        "top_tokens_preview": dg.MetadataValue.md(
            preview.groupby("feature")["token"].apply(lambda t: " · ".join(map(repr, t))).to_frame().to_markdown()
        ),
    }
    return dg.MaterializeResult(metadata=metadata)
