"""Activation agreement: the weight-based reading of each feature against what it does on the release's corpus."""

import zlib
from dataclasses import replace

import dagster as dg
import numpy as np
import torch

from assets.common import check_results, check_specs, sae_of, store_table
from core.agreement import agreement_stage
from core.discovery import fetch_corpus, fetch_runnable_model, load_sae
from core.frames import with_sae
from core.table_checks import Check, finite, ids_in_range, rows_match
from orchestration.partitions import sae_partitions
from orchestration.resources import ComputeResource, HubResource, StoreResource

CONTEXT = 64  # tokens per corpus window
CHECKS = ["one_row_per_feature", "values_valid", "token_ids_in_vocab"]


def agreement_checks(out: dict, d_sae: int, vocab_size: int) -> list[Check]:
    """The asset checks of ``core.agreement.agreement_stage``'s tables (descriptions: ``assets.common``)."""
    summary, agree = out["agreement_summary"], out["activation_agreement"]
    overlaps = agree.drop(columns="feature").to_numpy(dtype=float)
    in_range = bool(
        summary["p_value"].between(0, 1).all() and (np.isnan(overlaps) | ((overlaps >= 0) & (overlaps <= 1))).all()
    )
    statistics = finite("values_valid", summary, ["value", "control"])
    return [
        rows_match("one_row_per_feature", out["activation_features"], d_sae),
        Check(
            "values_valid",
            statistics.passed and in_range,
            f"{statistics.detail}; p-values and overlaps {'in' if in_range else 'outside'} [0, 1]",
        ),
        ids_in_range("token_ids_in_vocab", out["activation_tokens"], "token_id", vocab_size),
    ]


@dg.asset(
    partitions_def=sae_partitions,
    group_name="activations",
    deps=["lens_tables", "feature_classes"],
    kinds={"pytorch", "parquet"},
    check_specs=check_specs("activation_agreement", CHECKS),
)
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
        return dg.MaterializeResult(
            metadata={"skipped": dg.MetadataValue.text("the release provides no corpus")},
            check_results=check_results(
                [Check(name, True, "the release provides no corpus: nothing measured") for name in CHECKS]
            ),
        )
    _, _, sae = load_sae(ref, hub.client())
    root = fetch_runnable_model(ref.release, client).root
    model = (
        AutoModelForCausalLM.from_pretrained(  # eager attention: core.activations.attention_received reads
            root, dtype=torch.float32, attn_implementation="eager"
        )
        .to(compute.device)
        .eval()
    )  # its probabilities
    ids = torch.tensor(AutoTokenizer.from_pretrained(root)(corpus.read_text(), add_special_tokens=False)["input_ids"])
    chunks = ids[: len(ids) // CONTEXT * CONTEXT].view(-1, CONTEXT).to(compute.device)
    tables = store.tables()
    lens = {side: tables.read(f"{side}_lens_tokens", ref.key) for side in ("output", "input")}
    sae = replace(
        sae, **{f: getattr(sae, f).to(compute.device) for f in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")}
    )
    out = agreement_stage(
        model,
        sae,
        ref.layer,
        chunks,
        lens,
        tables.read("feature_classes", ref.key),
        tables.read("feature_participation", ref.key),
        k=compute.top_k,
        seed=zlib.crc32(ref.key.encode()),
    )
    metadata: dict[str, dg.MetadataValue] = {}
    for name, frame in out.items():
        metadata |= store_table(store, name, ref.key, with_sae(frame, ref))
    summary = out["agreement_summary"]
    metadata["agreement"] = dg.MetadataValue.md(summary.to_markdown(index=False, floatfmt=".3f"))
    metadata["corpus_tokens"] = dg.MetadataValue.int(int(chunks.numel()))
    return dg.MaterializeResult(
        metadata=metadata, check_results=check_results(agreement_checks(out, sae.d_sae, model.config.vocab_size))
    )
