"""The SAE files on the hub as an observable source asset: what the weights are computed from."""

from collections import defaultdict

import dagster as dg

from core.errors import HubError
from core.registry import parse_key
from core.weights.discovery import discover_saes
from orchestration.partitions import sae_partitions
from orchestration.resources import HubResource


@dg.observable_source_asset(
    partitions_def=sae_partitions,
    group_name="weights",
    description=(
        "One SAE's files in its hub repository (offline: the cache). Observed data version: the content id "
        "of the files (the hub's sha256 / git blob ids), the same id sae_weights records once it has read "
        "them — so the UI shows sae_weights as stale exactly when that SAE's bytes changed."
    ),
)
def sae_files(context: dg.AssetExecutionContext, hub: HubResource) -> dg.DataVersionsByPartition:
    """Content id per registered SAE partition, one repository listing per release."""
    by_release: dict[str, list[str]] = defaultdict(list)
    for key in context.instance.get_dynamic_partitions(sae_partitions.name):
        by_release[parse_key(key).release].append(key)
    versions: dict[str, str] = {}
    for release, keys in by_release.items():
        try:
            listing = discover_saes(release, hub.client())
        except HubError as error:
            context.log.warning(f"{release}: not observed ({error})")
            continue
        versions |= {key: listing.sae_fingerprint(parse_key(key)) for key in keys}
    return dg.DataVersionsByPartition(versions)
