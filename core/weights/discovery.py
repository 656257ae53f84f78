"""Which SAEs a release holds right now, and the files each SAE and its model need."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

from core.errors import WeightFileError
from core.registry import REGISTRY_PATH, Release, SaeRef, get_release
from core.weights.hub import Hub, Snapshot, content_id
from core.weights.model_weights import (
    CONFIG_FILE,
    INDEX_FILE,
    SINGLE_FILE,
    ModelCheckpoint,
    ModelGeometry,
    open_checkpoint,
)
from core.weights.sae_formats import FORMATS, GEMMA_SCOPE_2_CONFIG, SaeWeights, read_json

# Gemma Scope's width labels are powers of two cut to decimal thousands / millions: 16k = 16384, 65k = 65536,
# 131k = 131072, 1m = 1048576 latents
WIDTH_UNITS = {"": 1, "k": 1000, "m": 1000**2}


@dataclass(frozen=True)
class ReleaseListing:
    """A release's SAE repository at one revision, the SAEs found in it and its files' content ids."""

    release: Release
    revision: str
    saes: list[SaeRef]
    blobs: dict[str, str]

    def sae_fingerprint(self, ref: SaeRef) -> str:
        """Content id of one SAE's files (``core.weights.hub.content_id``): it changes only when that SAE's bytes
        change, and equals ``core.weights.hub.fingerprint`` of the same files once downloaded."""
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
    """Download one SAE's files (only its folder; its format's optional files where the repository has them)."""
    release = get_release(ref.release)
    fmt = FORMATS[release.format]
    return hub_for(release, hub).fetch(
        release.sae_repo,
        [f"{ref.folder}/{name}" for name in fmt.files],
        optional=[f"{ref.folder}/{name}" for name in fmt.optional_files],
    )


def fetch_model(release_id: str, hub: Hub) -> tuple[Snapshot, ModelCheckpoint]:
    """Download a release's model: its JSON files (config, shard index, tokenizer), then only the shards
    that hold the tensors the analysis reads."""
    release = get_release(release_id)
    hub = hub_for(release, hub)
    snapshot = hub.fetch(release.model_repo, ["*.json"])
    sharded = snapshot.path(INDEX_FILE).exists()  # else one file, whose header is read once it is downloaded
    shards = ModelCheckpoint(snapshot.root).needed_shards() if sharded else [SINGLE_FILE]
    snapshot = hub.fetch(release.model_repo, ["*.json", *shards], revision=snapshot.revision)
    checkpoint = open_checkpoint(snapshot.root)
    if checkpoint.geometry.n_layers != release.n_layers:
        raise WeightFileError(
            snapshot.path("config.json"),
            f"the model has {checkpoint.geometry.n_layers} layers but "
            f"release {release.id!r} in {REGISTRY_PATH} says n_layers: {release.n_layers}",
        )
    return snapshot, checkpoint


def model_geometry(release_id: str, hub: Hub) -> ModelGeometry:
    """The geometry of a release's model from its ``config.json`` alone (the model family of the release-level
    statistics: which pre-registered shapes apply)."""
    release = get_release(release_id)
    config = hub_for(release, hub).fetch(release.model_repo, [CONFIG_FILE]).path(CONFIG_FILE)
    return ModelGeometry.from_config(read_json(config), config)


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


class LoadedSae(NamedTuple):
    """What every per-SAE stage starts from: the model snapshot, its checkpoint (geometry, tensors) and the SAE."""

    snapshot: Snapshot
    checkpoint: ModelCheckpoint
    sae: SaeWeights


def load_sae(ref: SaeRef, hub: Hub) -> LoadedSae:
    """The load stage: fetch the model (``fetch_model``) and the SAE (``fetch_sae``), read the SAE in its format
    against the model's width, and check it against its id (``check_sae_files``)."""
    snapshot, checkpoint = fetch_model(ref.release, hub)
    folder = fetch_sae(ref, hub).path(ref.folder)
    sae = FORMATS[get_release(ref.release).format].read(folder, d_model=checkpoint.geometry.d_model)
    check_sae_files(ref, sae, folder)
    return LoadedSae(snapshot, checkpoint, sae)


def width_matches(width: str, d_sae: int) -> bool | None:
    """Whether a width label names ``d_sae`` latents: ``512`` exactly, ``16k`` / ``1m`` as ``d_sae`` cut to
    thousands / millions (``WIDTH_UNITS``); None for a label of another form."""
    match = re.fullmatch(r"(\d+)([km]?)", width)
    return d_sae // WIDTH_UNITS[match.group(2)] == int(match.group(1)) if match else None


def check_sae_files(ref: SaeRef, sae: SaeWeights, folder: Path) -> None:
    """What the SAE's id and folder say, checked against its files; raises ``WeightFileError`` naming the file:
    the width label against ``d_sae``; for Gemma Scope 2, where the folder has a ``config.json``, its
    ``architecture`` (``jump_relu``) and ``hf_hook_point_in`` (``model.layers.{layer}.output``: resid_post of the
    SAE's layer, the hook this project implements), the fields SAELens' Gemma 3 loader reads."""
    if ref.width and width_matches(ref.width, sae.d_sae) is False:
        raise WeightFileError(Path(sae.source), f"holds {sae.d_sae} latents but SAE {ref.key!r} says width {ref.width}")
    config_path = folder / GEMMA_SCOPE_2_CONFIG
    if get_release(ref.release).format != "gemma_scope_2_safetensors" or not config_path.exists():
        return
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightFileError(config_path, f"is not readable JSON: {exc}") from exc
    expected = {"architecture": "jump_relu", "hf_hook_point_in": f"model.layers.{ref.layer}.output"}
    wrong = {k: config.get(k) for k, v in expected.items() if config.get(k) != v}
    if wrong:
        raise WeightFileError(
            config_path,
            f"says {wrong} but SAE {ref.key!r} is a JumpReLU SAE on resid_post of layer {ref.layer} ({expected})",
        )
