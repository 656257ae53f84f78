"""Weight assets: fetch and verify an SAE and its model, record provenance and per-feature norms."""

import dagster as dg
import pandas as pd

from assets.common import check_results, check_specs, sae_of, store_table
from core.discovery import fetch_model, fetch_sae
from core.frames import with_sae
from core.hub import fingerprint
from core.model_weights import CONFIG_FILE, INDEX_FILE
from core.registry import get_release
from core.sae_formats import FORMATS
from core.table_checks import finite, rows_match
from orchestration.partitions import sae_partitions
from orchestration.resources import HubResource, StoreResource


@dg.asset(
    partitions_def=sae_partitions,
    group_name="weights",
    deps=["sae_files"],
    kinds={"huggingface", "parquet"},
    check_specs=check_specs("sae_weights", ["one_row_per_feature", "norms_finite"]),
)
def sae_weights(context: dg.AssetExecutionContext, hub: HubResource, store: StoreResource) -> dg.MaterializeResult:
    """One SAE's weights fetched from the hub cache and validated (shapes, dtype, finite values).

    Stores table ``sae_features``: ``release, sae_id, layer, feature, encoder_norm, decoder_norm,
    threshold`` — raw norms, kept for the magnitude analysis. Data version: the content hash of the
    SAE's files, so a new hub revision that leaves this SAE unchanged does not make it stale."""
    ref = sae_of(context)
    release = get_release(ref.release)
    fmt = FORMATS[release.format]
    snapshot = fetch_sae(ref, hub.client())
    sae = fmt.read(snapshot.path(ref.folder))
    frame = pd.DataFrame(
        {
            "feature": range(sae.d_sae),
            "encoder_norm": sae.encoder_norms.numpy(),
            "decoder_norm": sae.decoder_norms.numpy(),
            "threshold": sae.threshold.numpy(),
        }
    )
    files = [snapshot.path(f"{ref.folder}/{name}") for name in fmt.files]
    metadata = store_table(store, "sae_features", ref.key, with_sae(frame, ref))
    metadata.update(
        {
            "repo": dg.MetadataValue.text(release.sae_repo),
            "revision": dg.MetadataValue.text(snapshot.revision),
            "files": dg.MetadataValue.json({str(p.relative_to(snapshot.root)): p.stat().st_size for p in files}),
            "d_model": dg.MetadataValue.int(sae.d_model),
            "d_sae": dg.MetadataValue.int(sae.d_sae),
            "decoder_norm_mean": dg.MetadataValue.float(float(frame["decoder_norm"].mean())),
        }
    )
    checks = [
        rows_match("one_row_per_feature", frame, sae.d_sae),
        finite("norms_finite", frame, ["encoder_norm", "decoder_norm", "threshold"]),
    ]
    return dg.MaterializeResult(
        metadata=metadata, data_version=dg.DataVersion(fingerprint(files)), check_results=check_results(checks)
    )


@dg.asset(partitions_def=sae_partitions, group_name="weights", kinds={"huggingface"})
def model_weights(context: dg.AssetExecutionContext, hub: HubResource) -> dg.MaterializeResult:
    """The model the SAE reads: config.json geometry and only the safetensors shards holding the tensors
    the analysis needs (embedding, unembedding, norms, attention projections), each read and checked.

    Partitioned like the SAEs so one SAE's chain is self-contained; the download itself happens once per
    model (hub cache). Data version: the content hash of config, index (sharded models) and the needed shards —
    the files ``fetch_model`` downloaded (a shard holding only MLP weights is not), in the ``shards`` metadata."""
    ref = sae_of(context)
    release = get_release(ref.release)
    snapshot, checkpoint = fetch_model(ref.release, hub.client())
    g = checkpoint.geometry
    checkpoint.final_norm_gain()
    checkpoint.unembedding()
    checkpoint.attention(ref.layer)
    listed = [CONFIG_FILE, *([INDEX_FILE] if snapshot.path(INDEX_FILE).exists() else []), *checkpoint.needed_shards()]
    files = [snapshot.path(name) for name in listed]
    return dg.MaterializeResult(
        metadata={
            "repo": dg.MetadataValue.text(release.model_repo),
            "revision": dg.MetadataValue.text(snapshot.revision),
            "geometry": dg.MetadataValue.json(g.__dict__),
            "shards": dg.MetadataValue.json({str(p.relative_to(snapshot.root)): p.stat().st_size for p in files}),
        },
        data_version=dg.DataVersion(fingerprint(files)),
    )
