"""The SAE release registry: releases are data (``core/releases.yaml``), read into typed records.

An SAE is named the SAELens way — a release id plus an SAE id (``gemma-scope-2b-pt-res`` +
``layer_12/width_16k/average_l0_82``) — and, inside this project, by one string, its partition key
``"{release}:{sae_id}"``. Which SAEs a release holds is discovered from the repository's file listing
by matching the release's ``folder`` pattern, so a new layer or L0 folder on the hub is a new SAE
without any code change.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Iterable

import yaml

REGISTRY_PATH = Path(__file__).with_name("releases.yaml")
_FIELDS = {"layer": r"(?P<layer>\d+)", "width": r"(?P<width>[A-Za-z0-9.]+)", "l0": r"(?P<l0>\d+)"}


class UnknownReleaseError(KeyError):
    """A release or SAE id that the registry does not know."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class SaeRef:
    """One SAE of a release: where its files are and which layer of the model it reads."""

    release: str
    sae_id: str
    folder: str
    layer: int
    width: str | None = None
    l0: int | None = None

    @property
    def key(self) -> str:
        """The partition key naming this SAE: ``"{release}:{sae_id}"``."""
        return f"{self.release}:{self.sae_id}"


@dataclass(frozen=True)
class Release:
    """A registry entry (see the comments at the top of ``releases.yaml`` for each field)."""

    id: str
    sae_repo: str
    model_repo: str
    format: str
    hook: str
    n_layers: int
    folder: str
    sae_id: str
    aliases: tuple[str, ...] = ()
    track: bool = False
    planted: dict[str, Any] | None = field(default=None, compare=False, hash=False)

    def folder_regex(self) -> re.Pattern[str]:
        """The ``folder`` pattern as a regex whose named groups are the pattern's fields."""
        parts = re.split(r"\{(\w+)\}", self.folder)
        out = []
        for i, part in enumerate(parts):
            out.append(_FIELDS[part] if i % 2 else re.escape(part))
        return re.compile("".join(out))

    def discover(self, repo_files: Iterable[str], marker_file: str) -> list[SaeRef]:
        """SAEs present in a repository listing: folders matching the pattern that hold ``marker_file``.

        Sorted by (layer, width, l0) so partition order follows depth.
        """
        pattern = re.compile(self.folder_regex().pattern + "/" + re.escape(marker_file))
        refs = {}
        for path in repo_files:
            match = pattern.fullmatch(path)
            if match:
                ref = self._ref(match.groupdict())
                refs[ref.sae_id] = ref
        return sorted(refs.values(), key=lambda r: (r.layer, r.width or "", r.l0 or 0))

    def sae(self, sae_id: str) -> SaeRef:
        """Parse an SAE id of this release (``layer_3/width_512/average_l0_32``, ``l3r_8x``)."""
        id_regex = re.compile(re.sub(r"\\\{(\w+)\\\}", lambda m: _FIELDS[m.group(1)], re.escape(self.sae_id)))
        match = id_regex.fullmatch(sae_id)
        if not match:
            raise UnknownReleaseError(
                f"SAE id {sae_id!r} does not match release {self.id!r}'s pattern {self.sae_id!r}"
            )
        return self._ref(match.groupdict())

    def _ref(self, fields: dict[str, str]) -> SaeRef:
        layer = int(fields["layer"])
        if not 0 <= layer < self.n_layers:
            raise UnknownReleaseError(
                f"layer {layer} is outside release {self.id!r} (model has {self.n_layers} layers)"
            )
        return SaeRef(
            release=self.id,
            sae_id=self.sae_id.format(**fields),
            folder=self.folder.format(**fields),
            layer=layer,
            width=fields.get("width"),
            l0=int(fields["l0"]) if "l0" in fields else None,
        )


@cache
def load_registry(path: Path = REGISTRY_PATH) -> dict[str, Release]:
    """All releases of a registry file, keyed by id. Raises ValueError naming the file on bad entries."""
    raw = yaml.safe_load(path.read_text())
    releases = {}
    for rid, entry in (raw or {}).get("releases", {}).items():
        try:
            releases[rid] = Release(id=rid, **{**entry, "aliases": tuple(entry.get("aliases", ()))})
        except TypeError as exc:
            raise ValueError(f"{path}: release {rid!r} is malformed: {exc}") from exc
    return releases


def get_release(release_id: str, path: Path = REGISTRY_PATH) -> Release:
    """Look a release up by id or alias; unknown ids raise an error listing the known ones."""
    releases = load_registry(path)
    for release in releases.values():
        if release_id == release.id or release_id in release.aliases:
            return release
    names = sorted({*releases, *(a for r in releases.values() for a in r.aliases)})
    near = difflib.get_close_matches(release_id, names, n=3)
    hint = f" Did you mean {', '.join(near)}?" if near else ""
    raise UnknownReleaseError(
        f"Unknown SAE release {release_id!r}.{hint} Known releases: {', '.join(sorted(releases))}"
    )


def parse_key(key: str, path: Path = REGISTRY_PATH) -> SaeRef:
    """The SAE named by a partition key ``"{release}:{sae_id}"``."""
    release_id, sep, sae_id = key.partition(":")
    if not sep:
        raise UnknownReleaseError(f"SAE key {key!r} is not of the form 'release:sae_id'")
    return get_release(release_id, path).sae(sae_id)
