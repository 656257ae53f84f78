"""Which SAEs a release holds right now, and the files each SAE and its model need."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from core.errors import WeightFileError
from core.hub import Hub, Snapshot, content_id
from core.model_weights import INDEX_FILE, SINGLE_FILE, ModelCheckpoint
from core.registry import REGISTRY_PATH, Release, SaeRef, get_release
from core.sae_formats import FORMATS


@dataclass(frozen=True)
class ReleaseListing:
    """A release's SAE repository at one revision, the SAEs found in it and its files' content ids."""

    release: Release
    revision: str
    saes: list[SaeRef]
    blobs: dict[str, str]

    def sae_fingerprint(self, ref: SaeRef) -> str:
        """Content id of one SAE's files (``core.hub.content_id``): it changes only when that SAE's bytes
        change, and equals ``core.hub.fingerprint`` of the same files once downloaded."""
        names = FORMATS[self.release.format].files
        return content_id(self.blobs.get(f"{ref.folder}/{name}", "absent") for name in names)


def hub_for(release: Release, hub: Hub) -> Hub:
    """Generated (planted and trained) releases exist only in the local cache (their generator writes them there):
    always read them offline, so a machine with hub access never asks the hub for them."""
    return replace(hub, offline=True) if release.generated else hub


def discover_saes(release_id: str, hub: Hub) -> ReleaseListing:
    """List the SAE repository (hub, or the cache offline) and match the registry's folder pattern."""
    release = get_release(release_id)
    revision, blobs = hub_for(release, hub).list_blobs(release.sae_repo)
    marker = FORMATS[release.format].files[0]
    return ReleaseListing(release=release, revision=revision, saes=release.discover(blobs, marker), blobs=blobs)


def fetch_sae(ref: SaeRef, hub: Hub) -> Snapshot:
    """Download one SAE's files (only its folder)."""
    release = get_release(ref.release)
    return hub_for(release, hub).fetch(release.sae_repo, [f"{ref.folder}/{name}" for name in FORMATS[release.format].files])


def fetch_model(release_id: str, hub: Hub) -> tuple[Snapshot, ModelCheckpoint]:
    """Download a release's model: its JSON files (config, shard index, tokenizer), then only the shards
    that hold the tensors the analysis reads."""
    release = get_release(release_id)
    hub = hub_for(release, hub)
    snapshot = hub.fetch(release.model_repo, ["*.json"])
    sharded = snapshot.path(INDEX_FILE).exists()  # else one file, whose header is read once it is downloaded
    shards = ModelCheckpoint(snapshot.root).needed_shards() if sharded else [SINGLE_FILE]
    snapshot = hub.fetch(release.model_repo, ["*.json", *shards], revision=snapshot.revision)
    checkpoint = ModelCheckpoint(snapshot.root)
    if checkpoint.geometry.n_layers != release.n_layers:
        raise WeightFileError(snapshot.path("config.json"), f"the model has {checkpoint.geometry.n_layers} layers but "
                              f"release {release.id!r} in {REGISTRY_PATH} says n_layers: {release.n_layers}")
    return snapshot, checkpoint



def fetch_runnable_model(release_id: str, hub: Hub) -> Snapshot:
    """Every file of a release's model that transformers' ``from_pretrained`` reads (config, tokenizer, all
    weight shards): activation measurements run the model, so the MLP shards ``fetch_model`` skips are needed."""
    release = get_release(release_id)
    return hub_for(release, hub).fetch(release.model_repo, ["*.json", "*.safetensors"])


def fetch_corpus(release_id: str, hub: Hub) -> Path | None:
    """The release's held-out text (``corpus`` in releases.yaml, a file of its SAE repo); None without one."""
    release = get_release(release_id)
    if release.corpus is None:
        return None
    return hub_for(release, hub).fetch(release.sae_repo, [release.corpus]).path(release.corpus)
