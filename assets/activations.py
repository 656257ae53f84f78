"""Activation agreement: the weight-based reading of each feature against what it does on the release's corpus."""

import zlib
from dataclasses import replace

import dagster as dg
import torch

from assets.common import sae_of, store_table
from assets.interactions import load
from core.agreement import agreement_stage
from core.discovery import fetch_corpus, fetch_runnable_model
from core.frames import with_sae
from orchestration.partitions import sae_partitions
from orchestration.resources import ComputeResource, HubResource, StoreResource

CONTEXT = 64  # tokens per corpus window


@dg.asset(partitions_def=sae_partitions, group_name="activations", deps=["lens_tables", "feature_classes"],
          kinds={"pytorch", "parquet"})
def activation_agreement(
    context: dg.AssetExecutionContext, hub: HubResource, store: StoreResource, compute: ComputeResource
) -> dg.MaterializeResult:
    """For releases with a corpus (``corpus`` in releases.yaml: the trained releases' held-out text), the model is
    run on it (transformers, ``compute.device``) and each feature's firing, input tokens and removal effect
    (``core.activations``) are compared with its lenses and classes (``core.agreement.agreement_stage``).
    Tables ``activation_features``, ``activation_tokens``, ``activation_agreement``, ``agreement_summary``
    (statistic, value, control = shuffled features / labels, n). Releases without a corpus record that only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = sae_of(context)
    client = hub.client()
    corpus = fetch_corpus(ref.release, client)
    if corpus is None:
        return dg.MaterializeResult(metadata={"skipped": dg.MetadataValue.text("the release provides no corpus")})
    _, _, sae = load(ref, hub)
    root = fetch_runnable_model(ref.release, client).root
    model = AutoModelForCausalLM.from_pretrained(root, dtype=torch.float32).to(compute.device).eval()
    ids = torch.tensor(AutoTokenizer.from_pretrained(root)(corpus.read_text(), add_special_tokens=False)["input_ids"])
    chunks = ids[: len(ids) // CONTEXT * CONTEXT].view(-1, CONTEXT).to(compute.device)
    tables = store.tables()
    lens = {side: tables.read(f"{side}_lens_tokens", ref.key) for side in ("output", "input")}
    sae = replace(sae, **{f: getattr(sae, f).to(compute.device) for f in ("W_enc", "W_dec", "b_enc", "b_dec",
                                                                       "threshold")})
    out = agreement_stage(model, sae, ref.layer, chunks, lens, tables.read("feature_classes", ref.key),
                          k=compute.top_k, seed=zlib.crc32(ref.key.encode()))
    metadata: dict[str, dg.MetadataValue] = {}
    for name, frame in out.items():
        metadata |= store_table(store, name, ref.key, with_sae(frame, ref))
    summary = out["agreement_summary"]
    metadata["agreement"] = dg.MetadataValue.md(summary.to_markdown(index=False, floatfmt=".3f"))
    metadata["corpus_tokens"] = dg.MetadataValue.int(int(chunks.numel()))
    return dg.MaterializeResult(metadata=metadata)
