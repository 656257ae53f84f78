"""The SAE release registry: releases are data (``core/releases.yaml``), read into typed records.

An SAE is named the SAELens way — a release id plus an SAE id (``gemma-scope-2b-pt-res`` +
``layer_12/width_16k/average_l0_82``) — and, inside this project, by one string, its partition key
``"{release}:{sae_id}"``. Which SAEs a release holds is discovered from the repository's file listing
by matching the release's ``folder`` pattern, so a new layer or L0 folder on the hub is a new SAE
without any code change.

Patterns (``folder``, ``sae_id``) name fields in braces (``{layer}``) and may hold one optional segment in square
brackets, present only when its fields are: Gemma Scope 2's ``..._l0_{sparsity}[_seed_{seed}]`` matches both
``layer_13_width_262k_l0_medium`` and its retraining ``layer_13_width_262k_l0_medium_seed_1``.

SAELens' ``-canonical`` releases are aliases, not releases: ``gemma-scope-2b-pt-res-canonical`` +
``layer_12/width_16k/canonical`` names the one L0 folder its base release's ``canonical`` table picks
for (layer 12, width 16k), and resolves to that SAE's ``SaeRef`` — the same ``key`` as the concrete id,
so an SAE has one partition whichever way it is named.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from core.weights.sae_formats import FORMATS

REGISTRY_PATH = Path(__file__).with_name("releases.yaml")
HOOKS = ("resid_post",)  # hook points the lenses and the layer pairing implement (core.lens.circuits.paired_layers)
# Fields of folder / SAE id patterns: ``l0`` is Gemma Scope's numeric average_l0_N, ``sparsity`` Gemma Scope 2's
# named L0 bucket (``l0_small`` / ``l0_medium`` / ``l0_big``), ``seed`` its retrainings (``_seed_1``).
_FIELDS = {
    "layer": r"(?P<layer>\d+)",
    "width": r"(?P<width>[A-Za-z0-9.]+)",
    "l0": r"(?P<l0>\d+)",
    "sparsity": r"(?P<sparsity>[a-z]+)",
    "seed": r"(?P<seed>\d+)",
}
_OPTIONAL = re.compile(r"\[([^\[\]]*)\]")  # one optional segment of a pattern


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
    neuronpedia: str | None = None  # Neuronpedia's id "{model}/{layer}-{set}[__{suffix}]"; None if unknown

    @property
    def key(self) -> str:
        """The partition key naming this SAE: ``"{release}:{sae_id}"``."""
        return f"{self.release}:{self.sae_id}"


def _placeholders(pattern: str) -> list[str]:
    """The ``{field}`` names of a pattern, in order."""
    return re.findall(r"\{(\w*)\}", pattern)


def _known(field_name: str, value: str, known: Iterable[str], where: str = "") -> None:
    """Raise ``ValueError`` naming the field, the value and the nearest known values unless ``value`` is known."""
    known = sorted(known)
    if value not in known:
        by_case = {k.lower(): k for k in known}  # a wrong case is the likeliest slip ({L0} for {l0})
        near = [by_case[k] for k in difflib.get_close_matches(value.lower(), list(by_case), n=2)]
        hint = f" Did you mean {' or '.join(map(repr, near))}?" if near else ""
        raise ValueError(f"field {field_name!r}: {value!r}{' ' + where if where else ''} is not one of {known}.{hint}")


def _regex(pattern: str) -> str:
    """A pattern as a regex: each ``{field}`` its ``_FIELDS`` group, each ``[segment]`` an optional group."""

    def literal(text: str) -> str:
        return re.sub(r"\\\{(\w+)\\\}", lambda m: _FIELDS[m.group(1)], re.escape(text))

    parts = _OPTIONAL.split(pattern)  # literal, optional, literal, ...
    return "".join(literal(part) if i % 2 == 0 else f"(?:{literal(part)})?" for i, part in enumerate(parts))


def _format(pattern: str, fields: Mapping[str, str | None]) -> str:
    """A pattern filled with ``fields``; an optional segment is kept only when all its fields are given."""

    def segment(m: re.Match[str]) -> str:
        return m.group(1) if all(fields.get(name) is not None for name in _placeholders(m.group(1))) else ""

    return _OPTIONAL.sub(segment, pattern).format(**fields)


def _id_fields(pattern: str, sae_id: str) -> dict[str, str] | None:
    """The fields of ``sae_id`` read through an SAE id pattern (``layer_{layer}/width_{width}/...``), or
    None when it does not match; an absent optional field is None."""
    match = re.fullmatch(_regex(pattern), sae_id)
    return match.groupdict() if match else None


def _unknown(subject: str, name: str, candidates: Iterable[str], known: str) -> UnknownReleaseError:
    """The registry's error for a name it does not know: the nearest candidates, then what it knows."""
    near = difflib.get_close_matches(name, list(candidates), n=3)
    hint = f" Did you mean {', '.join(near)}?" if near else ""
    return UnknownReleaseError(f"Unknown {subject}.{hint} {known}")


def _span(layers: Iterable[int]) -> str:
    """``0-25`` for a contiguous run of layers, else ``5, 12, 19``."""
    s = sorted(layers)
    return f"{s[0]}-{s[-1]}" if len(s) > 2 and s == list(range(s[0], s[-1] + 1)) else ", ".join(map(str, s))


def l0_table(raw: dict[Any, Any]) -> dict[str, dict[int, int]]:
    """``{key: {layer: L0}}`` from the registry's L0 tables: per key (a width, an L0 bucket) either a list of L0s
    indexed by layer or a ``{layer: L0}`` mapping (released at a few layers only)."""
    out = {}
    for key, l0s in raw.items():
        pairs = enumerate(l0s) if isinstance(l0s, list) else l0s.items()
        out[str(key)] = {int(layer): int(value) for layer, value in pairs}
    return out


@dataclass(frozen=True)
class Canonical:
    """A release's SAELens ``-canonical`` alias (the ``canonical`` block of ``releases.yaml``).

    ``release`` is the alias release id, ``sae_id`` its SAE id pattern (``{layer}`` and ``{width}``, no
    L0), ``l0[width][layer]`` the L0 of the base release's folder each alias id stands for, and
    ``neuronpedia`` (optional) the Neuronpedia id pattern of those SAEs (``{layer}``, ``{width}``).
    """

    release: str
    sae_id: str
    l0: dict[str, dict[int, int]] = field(compare=False, hash=False)
    neuronpedia: str | None = None

    @classmethod
    def from_yaml(cls, raw: dict[str, Any]) -> Canonical:
        return cls(**{**raw, "l0": l0_table(raw["l0"])})

    def ids(self) -> list[str]:
        """Every alias SAE id, by width then layer."""
        return [self.sae_id.format(layer=n, width=w) for w, table in self.l0.items() for n in sorted(table)]

    def resolve(self, sae_id: str) -> dict[str, str] | None:
        """The base release's fields (layer, width, l0) an alias id stands for; None if ``sae_id`` is not
        of the alias pattern. An alias-shaped id absent from the table raises, naming the nearest ids."""
        fields = _id_fields(self.sae_id, sae_id)
        if fields is None:
            return None
        l0 = self.l0.get(fields["width"], {}).get(int(fields["layer"]))
        if l0 is None:
            known = "; ".join(f"width {w} at layer{'s' * (len(t) > 1)} {_span(t)}" for w, t in self.l0.items())
            raise _unknown(
                f"canonical SAE id {sae_id!r} of release {self.release!r}",
                sae_id,
                self.ids(),
                f"Canonical SAEs: {known}.",
            )
        return {**fields, "l0": str(l0)}

    def neuronpedia_id(self, fields: dict[str, str]) -> str | None:
        """The Neuronpedia id of the SAE with these fields when it is this alias' canonical one, else None."""
        layer, l0 = int(fields["layer"]), fields.get("l0")
        if self.neuronpedia is None or l0 is None or self.l0.get(fields["width"], {}).get(layer) != int(l0):
            return None
        return self.neuronpedia.format(**fields)


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
    canonical: Canonical | None = None
    neuronpedia: str | None = None
    neuronpedia_only: dict[str, str | None] | None = field(default=None, compare=False, hash=False)
    sparsity_l0: dict[str, dict[int, int]] | None = field(default=None, compare=False, hash=False)
    refused: dict[str, str] | None = field(default=None, compare=False, hash=False)
    planted: dict[str, Any] | None = field(default=None, compare=False, hash=False)
    trained: dict[str, Any] | None = field(default=None, compare=False, hash=False)
    corpus: str | None = None  # a text file in sae_repo that activation measurements read (trained releases)

    @property
    def generated(self) -> bool:
        """Written on this machine (``core.testbeds.planted`` / ``core.testbeds.trained``), on no hub: read offline,
        from the generated releases' own cache, on CPU."""
        return bool(self.planted or self.trained)

    def __post_init__(self) -> None:
        """Refuse, at load, what would otherwise load and fail later (a bare ``KeyError``) or silently drop
        SAEs: each message names the field; ``load_registry`` adds the file and the release."""
        _known("format", self.format, FORMATS)
        _known("hook", self.hook, HOOKS)
        patterns = {
            "folder": self.folder,
            "sae_id": self.sae_id,
            **({"neuronpedia": self.neuronpedia} if self.neuronpedia else {}),
        }
        if self.canonical:
            patterns |= {
                "canonical.sae_id": self.canonical.sae_id,
                **({"canonical.neuronpedia": self.canonical.neuronpedia} if self.canonical.neuronpedia else {}),
            }
        for name, pattern in patterns.items():
            for placeholder in _placeholders(pattern):
                _known(f"{name} placeholder", placeholder, _FIELDS, f"in {pattern!r}")
        folder, sae_id = set(_placeholders(self.folder)), set(_placeholders(self.sae_id))
        if folder != sae_id:  # an SAE id must name exactly one folder, and every folder must have an id
            raise ValueError(
                f"field 'sae_id' {self.sae_id!r} uses the fields {sorted(sae_id)} but 'folder' "
                f"{self.folder!r} uses {sorted(folder)}: SAEs differing only in "
                f"{sorted(folder ^ sae_id)} would get one id"
            )
        if "layer" not in folder:
            raise ValueError(f"field 'folder' {self.folder!r} has no {{layer}}: every SAE reads one layer")
        for name, table in (
            ("canonical", self.canonical.l0 if self.canonical else {}),
            ("sparsity_l0", self.sparsity_l0 or {}),
        ):  # L0 tables may only name the model's layers
            bad = sorted({n for t in table.values() for n in t if not 0 <= n < self.n_layers})
            if bad:
                raise ValueError(f"{name} table names layers {bad} outside the model's {self.n_layers}")
        if self.sparsity_l0 and "sparsity" not in folder:
            raise ValueError(f"field 'sparsity_l0' needs a {{sparsity}} in 'folder' {self.folder!r}")
        for name in self.neuronpedia_only or {}:
            _known("neuronpedia_only field", name, folder, f"(fields of {self.folder!r})")

    @property
    def names(self) -> tuple[str, ...]:
        """Every id this release answers to: its id, its aliases and its canonical alias release."""
        return (self.id, *self.aliases, *([self.canonical.release] if self.canonical else []))

    def folder_regex(self) -> re.Pattern[str]:
        """The ``folder`` pattern as a regex whose named groups are the pattern's fields."""
        return re.compile(_regex(self.folder))

    def discover(self, repo_files: Iterable[str], marker_file: str) -> list[SaeRef]:
        """SAEs present in a repository listing: folders matching the pattern that hold ``marker_file``.

        Sorted by (layer, width, l0, id) so partition order follows depth.
        """
        pattern = re.compile(self.folder_regex().pattern + "/" + re.escape(marker_file))
        refs = {}
        for path in repo_files:
            match = pattern.fullmatch(path)
            if match:
                ref = self._ref(match.groupdict())
                refs[ref.sae_id] = ref
        return sorted(refs.values(), key=lambda r: (r.layer, r.width or "", r.l0 or 0, r.sae_id))

    def sae(self, sae_id: str) -> SaeRef:
        """Parse an SAE id of this release (``layer_3/width_512/average_l0_32``, ``l3r_8x``) or of its
        canonical alias (``layer_3/width_512/canonical``: the concrete SAE it stands for)."""
        for prefix, reason in (self.refused or {}).items():
            if sae_id.startswith(prefix):
                raise UnknownReleaseError(f"SAE id {sae_id!r} of release {self.id!r} is not analysed here: {reason}")
        fields = _id_fields(self.sae_id, sae_id)
        if fields is None and self.canonical:
            fields = self.canonical.resolve(sae_id)
        if fields is None:
            also = f" or its canonical pattern {self.canonical.sae_id!r}" if self.canonical else ""
            raise UnknownReleaseError(
                f"SAE id {sae_id!r} does not match release {self.id!r}'s pattern {self.sae_id!r}{also}"
            )
        return self._ref(fields)

    def _ref(self, fields: dict[str, str]) -> SaeRef:
        layer = int(fields["layer"])
        if not 0 <= layer < self.n_layers:
            raise UnknownReleaseError(
                f"layer {layer} is outside release {self.id!r} (model has {self.n_layers} layers)"
            )
        return SaeRef(
            release=self.id,
            sae_id=_format(self.sae_id, fields),
            folder=_format(self.folder, fields),
            layer=layer,
            width=fields.get("width"),
            l0=self.l0_of(fields),
            neuronpedia=self.neuronpedia_id(fields),
        )

    def l0_of(self, fields: dict[str, str]) -> int | None:
        """The SAE's numeric L0: Gemma Scope's ``average_l0_N``, or Gemma Scope 2's bucket looked up in
        ``sparsity_l0`` (SAELens' values per bucket and layer); None when neither gives one."""
        if fields.get("l0") is not None:
            return int(fields["l0"])
        table = (self.sparsity_l0 or {}).get(str(fields.get("sparsity")), {})
        return table.get(int(fields["layer"]))

    def neuronpedia_id(self, fields: dict[str, str]) -> str | None:
        """The SAE's Neuronpedia id: the canonical alias' pattern when the SAE is the canonical one (Neuronpedia
        hosts those under the alias' set, e.g. ``gemma-2-2b/12-gemmascope-res-16k``), else the release's pattern
        (``gemma-2-2b/12-gemmascope-res-16k__l0-176``) where the SAE's fields equal ``neuronpedia_only``'s (Gemma
        Scope 2: the medium bucket, no seed); None when the release has none."""
        canonical = self.canonical.neuronpedia_id(fields) if self.canonical else None
        hosted = all(fields.get(name) == value for name, value in (self.neuronpedia_only or {}).items())
        return canonical or (self.neuronpedia.format(**fields) if self.neuronpedia and hosted else None)


@cache
def _raw_entries(path: Path) -> dict[str, dict[str, Any]]:
    return (yaml.safe_load(path.read_text()) or {}).get("releases", {})


def generator_entries(block: str, path: Path = REGISTRY_PATH) -> dict[str, dict[str, Any]]:
    """The registry entries (as written, by id) that carry a generator's parameter ``block`` (``planted`` for
    ``core.testbeds.planted``, ``trained`` for ``core.testbeds.trained``): the one reader of the registry file besides
    ``load_registry``."""
    return {rid: entry for rid, entry in _raw_entries(path).items() if block in entry}


@cache
def load_registry(path: Path = REGISTRY_PATH) -> dict[str, Release]:
    """All releases of a registry file, keyed by id. Raises ValueError naming the file on bad entries."""
    releases = {}
    for rid, entry in _raw_entries(path).items():
        try:
            for name in entry:
                _known("name", name, RELEASE_FIELDS, "(a release field)")
            canonical = Canonical.from_yaml(entry["canonical"]) if "canonical" in entry else None
            sparsity_l0 = l0_table(entry["sparsity_l0"]) if "sparsity_l0" in entry else None
            releases[rid] = Release(
                id=rid,
                **{
                    **entry,
                    "aliases": tuple(entry.get("aliases", ())),
                    "canonical": canonical,
                    "sparsity_l0": sparsity_l0,
                },
            )
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise ValueError(f"{path}: release {rid!r} is malformed: {exc}") from exc
    return releases


RELEASE_FIELDS = tuple(f.name for f in dataclass_fields(Release) if f.name != "id")


def get_release(release_id: str, path: Path = REGISTRY_PATH) -> Release:
    """Look a release up by id, alias or canonical alias id (which gives the base release: its ``sae``
    resolves the canonical SAE ids); unknown ids raise an error listing the known ones."""
    releases = load_registry(path)
    for release in releases.values():
        if release_id in release.names:
            return release
    known = sorted({*releases, *(r.canonical.release for r in releases.values() if r.canonical)})
    names = sorted({n for r in releases.values() for n in r.names})
    raise _unknown(f"SAE release {release_id!r}", release_id, names, f"Known releases: {', '.join(known)}")


def parse_key(key: str, path: Path = REGISTRY_PATH) -> SaeRef:
    """The SAE named by a partition key ``"{release}:{sae_id}"``."""
    release_id, sep, sae_id = key.partition(":")
    if not sep:
        raise UnknownReleaseError(f"SAE key {key!r} is not of the form 'release:sae_id'")
    return get_release(release_id, path).sae(sae_id)
