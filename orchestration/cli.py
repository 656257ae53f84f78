"""Command line: register a release's SAEs as partitions and materialise, in this process, what is stale or missing.

    weightlens materialize [RELEASE ...] [--sae ID ...] [--layers 5,12 | 5-12] [--width 16k ...] [--canonical]
                           [--device cuda] [--dtype bfloat16] [--circuit-layers all] [--circuit-set all]
                           [-c settings.yaml ...]
                           [--force] [--dry-run] [-v]
    (the same as ``python -m orchestration.cli materialize ...``)

``RELEASE``: registry release ids or aliases (``core/releases.yaml``; default: the planted releases the sensor
tracks); a SAELens ``-canonical`` release id (``gemma-scope-2b-pt-res-canonical``) selects that release's canonical
SAEs. Every SAE the release lists (``core.weights.discovery.discover_saes``: the hub, or the cache offline) becomes a
partition; the selection flags, SAELens' vocabulary, pick which of them run (all given flags must hold):
``--sae`` an SAE id of a named release (``layer_12/width_16k/average_l0_82``, a canonical alias
``layer_12/width_16k/canonical``, ``l12r_8x``) or a partition key ``RELEASE:SAE_ID`` (which also names its
release), repeatable; ``--layers``; ``--width`` (repeatable); ``--canonical``: the L0 the release's canonical table
picks per layer and width.

A selected SAE is skipped, with one line saying so, when it is current: every asset of its chain (``SAE_ASSETS``,
and for a release with a corpus, the trained ones, ``ACTIVATION_ASSETS``: the model run on its held-out text)
has a materialisation of that partition that Dagster's staleness (``CachingStaleStatusResolver``: same code
version, inputs' data versions unchanged since) calls fresh, ``sae_weights`` / ``model_weights`` recorded the
content ids the repository listings give now (a changed SAE or model file on the hub makes them stale), and the
assets that use the compute and store resources ran with the settings given now (the ComputeResource fields and
the data directory, recorded as the run tag ``weightlens/settings``; runs without it, from the UI or the sensor,
ran with the code location's defaults under their run config; the device is recorded, not compared). Otherwise
the stale assets and everything downstream of them in the chain are recomputed.
The report assets (``REPORT_ASSETS``) are rerun, all together, when a partition was recomputed or when one of them
is not current by the same rule — a partition materialised after the last report makes it stale.
``--force`` recomputes every selected partition and the report; ``--dry-run`` prints what would run and why and
runs, registers and changes nothing.

Settings: ``-c FILE`` (repeatable, merged in order) is run config in the format ``dagster job execute -c`` and
``python -m orchestration.cluster -c`` read (``resources: {hub|store|compute: {config: {...}}}``, see
``deploy/celery/resources.yaml``); ``--device``, ``--dtype``, ``--circuit-layers``, ``--circuit-set`` override its
``compute`` fields
(``orchestration.resources.ComputeResource``). Unset: the hub cache huggingface_hub would use (``HF_HUB_CACHE``,
else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``), ``$WEIGHTLENS_DATA_DIR``, the ComputeResource defaults.

Expected errors — the hub unreachable or offline without the files, an unknown release or SAE id, a gated
repository without a token, an unusable weight file, a bad setting or an empty selection — print one line to
stderr naming the hub cache used and exit with status 2; a run that fails otherwise exits with status 1.
Runs are recorded in the instance at ``$DAGSTER_HOME``, so the UI shows every materialisation afterwards; ``-v``
prints Dagster's event log on the console as well.
"""

from __future__ import annotations

import argparse
import difflib
import glob
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import torch
import yaml
from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
from dagster._core.definitions.data_version import DATA_VERSION_TAG, CachingStaleStatusResolver
from dagster._time import get_current_datetime
from dagster._utils.error import SerializableErrorInfo
from dagster_shared.check import CheckError
from dagster_shared.yaml_utils import load_yaml_from_glob_list

from core.errors import HubError, WeightFileError
from core.lens.circuits import CIRCUIT_SETS, LAYER_SCOPES
from core.registry import Release, SaeRef, UnknownReleaseError, get_release, load_registry, parse_key
from core.weights.discovery import ReleaseListing, discover_saes, hub_for
from core.weights.hub import content_id
from orchestration.definitions import ACTIVATION_ASSETS, REPORT_ASSETS, SAE_ASSETS, defs
from orchestration.partitions import sae_partitions
from orchestration.recovery import fail_dead_runs
from orchestration.resources import ComputeResource, HubResource, StoreResource, default_data_dir

SETTINGS_TAG = "weightlens/settings"
RESOURCE_TYPES: dict[str, type[dg.ConfigurableResource]] = {
    "hub": HubResource,
    "store": StoreResource,
    "compute": ComputeResource,
}
CHAIN = [key for asset in SAE_ASSETS for key in asset.keys]
ACTIVATION = [key for asset in ACTIVATION_ASSETS for key in asset.keys]
REPORT = [key for asset in REPORT_ASSETS for key in asset.keys]
RESOURCES_OF = {
    key: asset.required_resource_keys
    for asset in (*SAE_ASSETS, *ACTIVATION_ASSETS, *REPORT_ASSETS)
    for key in asset.keys
}


def chain_of(release_id: str) -> list[dg.AssetKey]:
    """The assets of one SAE partition of the release: ``CHAIN``, then ``ACTIVATION`` when it has a corpus."""
    return CHAIN + ACTIVATION if get_release(release_id).corpus else CHAIN


# Recorded but not compared: CPU and GPU results agree to float rounding (orchestration.versions calls the device
# neutral too); --force recomputes on another device.
NEUTRAL_SETTINGS = {("compute", "device")}


class CliError(SystemExit):
    """An expected error: ``main`` prints it as one line naming the hub cache and exits with status 2. Raised
    through another command line that imports these functions, it prints the message and exits with status 1,
    as ``SystemExit(message)`` does."""


EXPECTED_ERRORS = (CliError, HubError, UnknownReleaseError, WeightFileError)


def one_line(error: BaseException | str) -> str:
    """The message with its line breaks and runs of spaces as single spaces."""
    return " ".join(str(error).split())


def hub_cache_dir() -> Path:
    """The hub cache huggingface_hub uses, read from the environment now (its own constants are read once, at
    import): ``HF_HUB_CACHE``, else the legacy ``HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``."""
    home = os.getenv("HF_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", os.path.join("~", ".cache")), "huggingface"))
    cache = os.getenv("HF_HUB_CACHE", os.getenv("HUGGINGFACE_HUB_CACHE", os.path.join(home, "hub")))
    return Path(os.path.expandvars(os.path.expanduser(cache)))


# -- settings -----------------------------------------------------------------------------------------------------


def load_settings(paths: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{resource: config}`` from run-config YAML files, merged in order by Dagster's own loader (the one
    ``dagster job execute -c`` uses, so the files ``orchestration.cluster -c`` takes work here unchanged)."""
    missing = [path for path in paths if not glob.glob(path)]
    if missing:
        raise CliError(f"settings file not found: {', '.join(missing)}")
    try:
        raw = load_yaml_from_glob_list(list(paths)) if paths else {}
    except (yaml.YAMLError, CheckError) as error:
        raise CliError(f"settings file unreadable: {one_line(error)}") from error
    other = sorted(map(str, set(raw) - {"resources"}))
    if other:
        raise CliError(f"settings files may set only `resources` here, not {', '.join(other)}")
    settings = {}
    for name, entry in (raw.get("resources") or {}).items():
        if name not in RESOURCE_TYPES:
            raise CliError(f"settings: unknown resource {name!r} (known: {', '.join(RESOURCE_TYPES)})")
        fields = RESOURCE_TYPES[name].model_fields
        config = entry.get("config") or {} if isinstance(entry, Mapping) and set(entry) <= {"config"} else None
        if not isinstance(config, Mapping) or set(config) - set(fields):
            raise CliError(f"settings: resources.{name} takes `config:` with fields {', '.join(fields)}; got {entry!r}")
        settings[str(name)] = dict(config)
    return settings


def build_resources(config: Mapping[str, Mapping[str, Any]]) -> dict[str, dg.ConfigurableResource]:
    """The resources of a run: ``config`` over defaults read from the environment now (hub cache, data dir)."""
    defaults: dict[str, dict[str, Any]] = {
        "hub": {"cache_dir": str(hub_cache_dir())},
        "store": {"data_dir": default_data_dir()},
        "compute": {},
    }
    try:
        resources = {name: kind(**{**defaults[name], **config.get(name, {})}) for name, kind in RESOURCE_TYPES.items()}
        resources["compute"].torch_dtype()
    except ValueError as error:  # pydantic's ValidationError is one
        raise CliError(f"invalid settings: {one_line(error)}") from error
    return resources


def settings_of(resources: Mapping[str, dg.ConfigurableResource]) -> dict[str, dict[str, Any]]:
    """What a run's results depend on besides code and inputs, by resource: the compute settings (the device
    resolved) and the data directory."""
    compute = resources["compute"]
    return {
        "compute": {**compute.model_dump(), "device": compute.resolved_device()},
        "store": {"data_dir": str(Path(resources["store"].data_dir).resolve())},
    }


def recorded_settings(run: dg.DagsterRun) -> dict[str, dict[str, Any]]:
    """The settings a run used: its ``weightlens/settings`` tag, or — a run launched from the UI or by a sensor —
    the code location's defaults under the resource config of its run config."""
    if SETTINGS_TAG in run.tags:
        return json.loads(run.tags[SETTINGS_TAG])
    config = {name: (entry or {}).get("config") or {} for name, entry in run.run_config.get("resources", {}).items()}
    return settings_of(build_resources(config))


# -- what to materialise --------------------------------------------------------------------------------------------


def default_releases() -> list[str]:
    """What ``materialize`` runs when no release is named: the planted releases the sensor tracks."""
    return [r.id for r in load_registry().values() if r.planted and r.track]


def list_saes(release_ids: Sequence[str], hub: HubResource) -> list[ReleaseListing]:
    """Each release's SAE listing (hub, or the cache offline); a release that lists no SAE is an error."""
    listings = [discover_saes(release_id, hub.client()) for release_id in release_ids]
    for listing in listings:
        if not listing.saes:
            raise CliError(f"{listing.release.id}: no SAEs found in {listing.release.sae_repo}@{listing.revision}")
    return listings


def register_partitions(instance: dg.DagsterInstance, release_ids: Sequence[str], hub: HubResource) -> list[str]:
    """Discover the SAEs of each release (hub, or the cache offline) and add their partition keys."""
    keys = [ref.key for listing in list_saes(release_ids, hub) for ref in listing.saes]
    instance.add_dynamic_partitions(sae_partitions.name, keys)
    return keys


def layer_set(text: str) -> frozenset[int]:
    """``--layers``: ``5,12``, ``5-12`` or both (``0,5-7``)."""
    layers: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            low, high = int(first), int(last if dash else first)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a layer list (write 5,12 or 5-12)") from None
        if high < low:
            raise argparse.ArgumentTypeError(f"{part!r}: the range runs backwards")
        layers.update(range(low, high + 1))
    return frozenset(layers)


@dataclass(frozen=True)
class Targets:
    """The releases to list and what to pick from them: partition keys (``--sae``; empty = any), layers, widths
    (empty = any), and the releases whose canonical SAEs only are wanted."""

    releases: tuple[Release, ...]
    saes: frozenset[str] = frozenset()
    layers: frozenset[int] = frozenset()
    widths: frozenset[str] = frozenset()
    canonical: frozenset[str] = frozenset()

    def picks(self, ref: SaeRef, release: Release) -> bool:
        canonical = release.canonical.l0.get(ref.width or "", {}).get(ref.layer) if release.canonical else None
        return (
            (not self.saes or ref.key in self.saes)
            and (not self.layers or ref.layer in self.layers)
            and (not self.widths or ref.width in self.widths)
            and (release.id not in self.canonical or ref.l0 == canonical)
        )


def sae_named(sae_id: str, releases: Iterable[Release]) -> SaeRef:
    """The SAE an ``--sae`` id names in one of ``releases`` (canonical aliases resolved)."""
    matches, errors = [], []
    for release in releases:
        try:
            matches.append(release.sae(sae_id))
        except UnknownReleaseError as error:
            errors.append(error)
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise CliError(f"SAE id {sae_id!r} is an id of {', '.join(m.release for m in matches)}: write RELEASE:SAE_ID")
    if len(errors) == 1:
        raise errors[0]
    raise CliError(
        f"SAE id {sae_id!r} matches no SAE id pattern of {', '.join(r.id for r in releases)}: "
        "name its release, or write RELEASE:SAE_ID"
    )


def resolve_targets(
    names: Sequence[str], sae_ids: Sequence[str], layers: frozenset[int], widths: Sequence[str], canonical: bool
) -> Targets:
    """Releases named (or those of ``RELEASE:SAE_ID`` keys, or the default ones) and the selection flags."""
    releases: dict[str, Release] = {}
    aliased = set()
    for name in names:
        release = get_release(name)
        releases[release.id] = release
        if release.canonical and name == release.canonical.release:
            aliased.add(release.id)
    keyed = [parse_key(sae) for sae in sae_ids if ":" in sae]
    for ref in keyed:
        releases.setdefault(ref.release, get_release(ref.release))
    releases = releases or {r: get_release(r) for r in default_releases()}
    saes = {ref.key for ref in keyed} | {sae_named(s, releases.values()).key for s in sae_ids if ":" not in s}
    if canonical:
        lacking = [r for r in releases.values() if r.canonical is None]
        if lacking:
            raise CliError(
                f"--canonical: release {', '.join(r.id for r in lacking)} has no canonical table (core/releases.yaml)"
            )
        aliased = set(releases)
    return Targets(tuple(releases.values()), frozenset(saes), layers, frozenset(widths), frozenset(aliased))


def select(listings: Sequence[ReleaseListing], targets: Targets) -> list[SaeRef]:
    """The listed SAEs the targets pick; an ``--sae`` the repository lacks, or an empty pick, is an error."""
    unlisted = sorted(targets.saes - {ref.key for listing in listings for ref in listing.saes})
    if unlisted:
        listing = next(entry for entry in listings if entry.release.id == parse_key(unlisted[0]).release)
        near = difflib.get_close_matches(unlisted[0], [ref.key for ref in listing.saes], n=3)
        raise CliError(
            f"SAE {unlisted[0]} is not in {listing.release.sae_repo}@{listing.revision[:12]}"
            + (f"; nearest: {', '.join(near)}" if near else "")
        )
    picked = [ref for listing in listings for ref in listing.saes if targets.picks(ref, listing.release)]
    if not picked:
        there = "; ".join(
            f"{entry.release.id}: layers {sorted({r.layer for r in entry.saes})}, widths "
            f"{sorted({str(r.width) for r in entry.saes})}"
            for entry in listings
        )
        raise CliError(f"no listed SAE matches the selection ({there})")
    return picked


# -- staleness -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What to do for one partition (``key``) or the report (``key`` None): the assets to recompute (none: it is
    current) and why."""

    key: str | None
    assets: tuple[dg.AssetKey, ...]
    reasons: tuple[str, ...]

    def line(self, dry_run: bool) -> str:
        what = self.key or "report"
        if not self.assets:
            return f"skip {what}: current (code versions, input data versions and settings unchanged)"
        names = ", ".join(key.to_user_string() for key in self.assets) if self.key else "every report asset"
        return f"{'would run' if dry_run else 'run'} {what}: {'; '.join(self.reasons)} -> {names}"


def explain(found: Mapping[str, Sequence[dg.AssetKey]]) -> tuple[str, ...]:
    """``why: asset, asset`` per cause."""
    return tuple(f"{why}: {', '.join(asset.to_user_string() for asset in assets)}" for why, assets in found.items())


class Planner:
    """Decides, from the instance's records, what a partition or the report needs (module docstring). Dagster's
    stale-status resolver and the asset graph view it loads through are internal API (``dagster._core``), stable
    within the pinned dagster 1.13.27."""

    def __init__(
        self,
        instance: dg.DagsterInstance,
        resources: Mapping[str, dg.ConfigurableResource],
        listings: Sequence[ReleaseListing],
    ) -> None:
        self.instance = instance
        keys = [ref.key for listing in listings for ref in listing.saes]  # all listed: estimates use the others
        self.records = {asset: self.latest_by_partition(asset, keys) for asset in CHAIN + ACTIVATION}
        self.hub = resources["hub"].client()
        self.settings = settings_of(resources)
        self.listings = {listing.release.id: listing for listing in listings}
        self.graph = defs.resolve_asset_graph()
        view = AssetGraphView(
            temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
            instance=instance,
            asset_graph=self.graph,
        )
        self.resolver = CachingStaleStatusResolver(instance, self.graph, view)
        self._run_settings: dict[str, dict[str, dict[str, Any]]] = {}
        self._model_blobs: dict[str, dict[str, str]] = {}
        self._step_seconds: dict[str, dict[str, float]] = {}

    def latest_by_partition(self, asset: dg.AssetKey, keys: Sequence[str]) -> dict[str, dg.EventLogRecord]:
        """The latest materialisation of each of these partitions of ``asset`` (one query a page, not one a key)."""
        latest: dict[str, dg.EventLogRecord] = {}
        cursor = None
        while True:
            page = self.instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=asset, asset_partitions=list(keys)), limit=1000, cursor=cursor
            )
            for record in page.records:  # newest first
                latest.setdefault(str(record.partition_key), record)
            if not page.has_more:
                return latest
            cursor = page.cursor

    def latest(self, asset: dg.AssetKey, partition: str | None) -> dg.EventLogRecord | None:
        if partition is not None:
            return self.records[asset].get(partition)
        records = self.instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=asset), limit=1).records
        return records[0] if records else None

    def partition(self, ref: SaeRef, force: bool) -> Plan:
        chain = chain_of(ref.release)
        if force:
            return Plan(ref.key, tuple(chain), ("--force",))
        found = self.causes(chain, ref)
        todo = {asset for assets in found.values() for asset in assets}
        for asset in self.graph.toposorted_asset_keys:  # and everything downstream of a stale asset in the chain
            if asset in chain and self.graph.get(asset).parent_keys & todo:
                todo.add(asset)
        return Plan(ref.key, tuple(a for a in chain if a in todo), explain(found))

    def report(self, recomputed: int, force: bool) -> Plan:
        if force or recomputed:
            return Plan(None, tuple(REPORT), ("--force",) if force else (f"{recomputed} SAE partition(s) recomputed",))
        found = self.causes(REPORT, None)
        return Plan(None, tuple(REPORT) if found else (), explain(found))

    def causes(self, assets: Sequence[dg.AssetKey], ref: SaeRef | None) -> dict[str, list[dg.AssetKey]]:
        """{why: the assets it makes stale} over ``assets`` of partition ``ref`` (None: unpartitioned)."""
        found: dict[str, list[dg.AssetKey]] = {}
        for asset in assets:
            record = self.latest(asset, ref.key if ref else None)
            for cause in self.stale_reasons(asset, record, ref) if record else ["never materialised"]:
                found.setdefault(cause, []).append(asset)
        return found

    def stale_reasons(self, asset: dg.AssetKey, record: dg.EventLogRecord, ref: SaeRef | None) -> list[str]:
        """Why the latest materialisation ``record`` of ``asset`` (partition ``ref``) is not current; empty if it is."""
        partition = ref.key if ref else None
        dependencies: dict[str, list[str]] = {}  # Dagster's reason (and dependency) -> the dependency's partitions
        for cause in self.resolver.get_stale_causes(asset, partition):
            dep = cause.dependency
            reason = cause.reason.removeprefix("has a ").removeprefix("has ")
            if dep and dep.asset_key.to_user_string() not in reason:
                reason += f" of {dep.asset_key.to_user_string()}"
            others = dependencies.setdefault(reason, [])
            if dep and dep.partition_key not in (None, partition):
                others.append(dep.partition_key)
        reasons = [
            reason + (f" ({len(keys)} partition(s): {', '.join(keys[:2])}{', ...' * (len(keys) > 2)})" if keys else "")
            for reason, keys in dependencies.items()
        ]
        version = (record.asset_materialization.tags or {}).get(DATA_VERSION_TAG)
        if ref and asset == dg.AssetKey("sae_weights") and version != self.listings[ref.release].sae_fingerprint(ref):
            listing = self.listings[ref.release]
            reasons.append(f"SAE files changed ({listing.release.sae_repo}@{listing.revision[:12]})")
        if ref and asset == dg.AssetKey("model_weights") and version != self.model_fingerprint(ref, record):
            reasons.append(f"model files changed ({get_release(ref.release).model_repo})")
        then = self.run_settings(record.run_id)
        changes = [
            f"{field} {then.get(resource, {}).get(field)!r} -> {value!r}"
            for resource in sorted(RESOURCES_OF[asset] & set(self.settings))
            for field, value in self.settings[resource].items()
            if (resource, field) not in NEUTRAL_SETTINGS and then.get(resource, {}).get(field) != value
        ]
        if changes:
            reasons.append(f"settings changed ({', '.join(changes)})")
        return reasons

    def model_fingerprint(self, ref: SaeRef, record: dg.EventLogRecord) -> str | None:
        """Content id, in the model repository's current listing, of the files ``model_weights`` read (its
        ``shards`` metadata: config and weight shards); None when that record lists no files."""
        shards = record.asset_materialization.metadata.get("shards")
        if shards is None:
            return None
        if ref.release not in self._model_blobs:
            release = get_release(ref.release)
            self._model_blobs[ref.release] = hub_for(release, self.hub).list_blobs(release.model_repo)[1]
        blobs = self._model_blobs[ref.release]
        return content_id(blobs.get(path, "absent") for path in shards.value)

    def estimate(self, plans: Sequence[Plan]) -> str:
        """``N partition(s) to recompute (asset on n, ...), roughly T``: T sums, per asset to run, its last
        step's duration for that partition, else the median over the partitions of that release that have one
        (Dagster's step stats of the recorded runs); assets never timed are counted, not guessed."""
        todo = [plan for plan in plans if plan.key and plan.assets]
        if not todo:
            return "nothing to recompute"
        seconds, untimed = 0.0, 0
        for plan in todo:
            for asset in plan.assets:
                took = self.step_seconds(asset, plan.key) or self.typical_seconds(asset, plan.key.partition(":")[0])
                seconds, untimed = (seconds + took, untimed) if took is not None else (seconds, untimed + 1)
        counts = ", ".join(
            f"{asset.to_user_string()} on {n}"
            for asset in CHAIN + ACTIVATION
            if (n := sum(asset in plan.assets for plan in todo))
        )
        timed = f"roughly {_duration(seconds)} from earlier runs" if seconds else "no earlier run to time them by"
        return f"plan: {len(todo)} partition(s) to recompute ({counts}), {timed}" + (
            f" ({untimed} asset step(s) never timed)" if untimed and seconds else ""
        )

    def step_seconds(self, asset: dg.AssetKey, partition: str) -> float | None:
        """Wall seconds of the step that produced the latest materialisation of ``asset`` for ``partition``."""
        record = self.records[asset].get(partition)
        if record is None:
            return None
        if record.run_id not in self._step_seconds:
            self._step_seconds[record.run_id] = {
                stats.step_key: stats.end_time - stats.start_time
                for stats in self.instance.get_run_step_stats(record.run_id)
                if stats.start_time and stats.end_time
            }
        return self._step_seconds[record.run_id].get(asset.to_python_identifier())

    def typical_seconds(self, asset: dg.AssetKey, release: str) -> float | None:
        """The median ``step_seconds`` of ``asset`` over the recorded partitions of ``release``."""
        found = [
            s
            for key in self.records[asset]
            if key.startswith(f"{release}:")
            if (s := self.step_seconds(asset, key)) is not None
        ]
        return float(sorted(found)[len(found) // 2]) if found else None

    def run_settings(self, run_id: str) -> dict[str, dict[str, Any]]:
        if run_id not in self._run_settings:
            run = self.instance.get_run_by_id(run_id)
            self._run_settings[run_id] = recorded_settings(run) if run else {}
        return self._run_settings[run_id]


# -- running -------------------------------------------------------------------------------------------------------


def expected_cause(error: SerializableErrorInfo | None) -> SerializableErrorInfo | None:
    """The first expected error (``EXPECTED_ERRORS``) in a step failure's chain of causes."""
    names = {kind.__name__ for kind in EXPECTED_ERRORS}
    while error is not None and error.cls_name not in names:
        error = error.cause
    return error


def run_assets(
    instance: dg.DagsterInstance,
    selection: Sequence[dg.AssetKey],
    partition: str | None,
    resources: Mapping[str, dg.ConfigurableResource],
    verbose: bool = False,
) -> None:
    """Materialise ``selection`` (of the partition, or the report) in one run tagged with the settings. A failure
    with an expected cause raises ``CliError`` naming it; any other failure exits with status 1."""
    assets = [*SAE_ASSETS, *ACTIVATION_ASSETS] if partition else REPORT_ASSETS
    result = dg.materialize(
        assets,
        selection=list(selection),
        partition_key=partition,
        instance=instance,
        resources=dict(resources),
        tags={SETTINGS_TAG: json.dumps(settings_of(resources), sort_keys=True)},
        raise_on_error=False,
        run_config={"loggers": {"console": {"config": {"log_level": "DEBUG" if verbose else "CRITICAL"}}}},
    )
    if result.success:
        return
    what = partition or "the release statistics, plots or report"
    errors = [event.step_failure_data.error for event in result.get_step_failure_events()]
    for error in errors:
        if cause := expected_cause(error):
            message = cause.message.strip()  # "core.errors.HubError: ..."
            raise CliError(f"{what}: {message.partition(f'{cause.cls_name}: ')[2] or message}")
    for error in errors if not verbose else ():
        print(error.to_string() if error else "a step failed without an error", file=sys.stderr)
    raise SystemExit(f"materialisation of {what} failed (run {result.run_id}); see the run in the Dagster UI")


def materialize_all(
    instance: dg.DagsterInstance, keys: Sequence[str], resources: Mapping[str, dg.ConfigurableResource]
) -> None:
    """Materialise the whole SAE chain for every key, then the report (what ``--force`` does); stop at the first
    failure."""
    for i, key in enumerate(keys, 1):
        print(f"[{i}/{len(keys)}] {key}", flush=True)
        run_assets(instance, chain_of(parse_key(key).release), key, resources)
    run_assets(instance, REPORT, None, resources)


def resources_for(args: argparse.Namespace) -> dict[str, dg.ConfigurableResource]:
    """The resources of this invocation: ``-c`` files, then the compute flags, over the defaults."""
    config = load_settings(args.config)
    flags = {
        "device": args.device,
        "dtype": args.dtype,
        "circuit_layers": args.circuit_layers,
        "circuit_set": args.circuit_set,
    }
    config["compute"] = {**config.get("compute", {}), **{k: v for k, v in flags.items() if v is not None}}
    resources = build_resources(config)
    device = resources["compute"].resolved_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"--device {device}: CUDA is not available on this machine")
    return resources


def materialize(args: argparse.Namespace, resources: Mapping[str, dg.ConfigurableResource]) -> None:
    """Plan every selected partition and the report, print one line each, run what is not current."""
    targets = resolve_targets(args.releases, args.sae, args.layers, args.width, args.canonical)
    listings = list_saes([release.id for release in targets.releases], resources["hub"])
    refs = select(listings, targets)
    print("settings: " + ", ".join(f"{k}={v}" for part in settings_of(resources).values() for k, v in part.items()))
    with dg.DagsterInstance.get() as instance:
        if not args.dry_run:
            for run_id in fail_dead_runs(instance):
                print(f"run {run_id}: its process is gone (killed); marked failed, pool slot freed", file=sys.stderr)
            instance.add_dynamic_partitions(sae_partitions.name, [ref.key for entry in listings for ref in entry.saes])
        planner = Planner(instance, resources, listings)
        plans = [planner.partition(ref, args.force) for ref in refs]
        todo = [plan for plan in plans if plan.assets]
        plans.append(planner.report(len(todo), args.force))
        print(planner.estimate(plans), flush=True)
        for plan in plans:
            print(plan.line(args.dry_run), flush=True)
            if plan.assets and not args.dry_run:
                run_assets(instance, plan.assets, plan.key, resources, args.verbose)
    done = "would be recomputed" if args.dry_run else "recomputed"
    print(
        f"done: {len(todo)} of {len(refs)} selected SAE partition(s) {done}, the report "
        f"{done if plans[-1].assets else 'current'}",
        file=sys.stderr,
    )


def _duration(seconds: float) -> str:
    return (
        f"{seconds:.0f} s"
        if seconds < 120
        else f"{seconds / 60:.0f} min"
        if seconds < 7200
        else f"{seconds / 3600:.1f} h"
    )


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weightlens", description="Weight-only SAE feature analysis (Dagster assets)")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("materialize", help="register SAE partitions and materialise what is stale or missing")
    cmd.add_argument("releases", nargs="*", help="release ids (default: the planted releases the sensor tracks)")
    pick = cmd.add_argument_group("selection (SAELens ids; every given flag must hold)")
    pick.add_argument("--sae", action="append", default=[], metavar="ID", help="SAE id or RELEASE:SAE_ID (repeatable)")
    pick.add_argument("--layers", type=layer_set, default=frozenset(), metavar="5,12|5-12", help="layers")
    pick.add_argument("--width", action="append", default=[], metavar="16k", help="SAE width (repeatable)")
    pick.add_argument("--canonical", action="store_true", help="only the release's canonical L0 per layer and width")
    settings = cmd.add_argument_group("compute settings (override -c)")
    settings.add_argument(
        "-c",
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="run config YAML with resources (hub, store, compute); repeatable",
    )
    settings.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    settings.add_argument("--dtype", help="matmul precision: float32 (default) or bfloat16")
    settings.add_argument("--circuit-layers", choices=LAYER_SCOPES, help="attention layers paired with an SAE")
    settings.add_argument(
        "--circuit-set",
        choices=sorted(CIRCUIT_SETS),
        help="circuit kinds computed: used (what the classes read, default) or all (adds ov)",
    )
    cmd.add_argument("--force", action="store_true", help="recompute the selected partitions and the report")
    cmd.add_argument("--dry-run", action="store_true", help="print what would run and why; run nothing")
    cmd.add_argument("-v", "--verbose", action="store_true", help="print Dagster's event log too")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    cache = hub_cache_dir()
    try:
        resources = resources_for(args)
        cache = Path(resources["hub"].cache_dir or cache)
        materialize(args, resources)
    except EXPECTED_ERRORS as error:
        print(f"weightlens: error: {one_line(error)} [hub cache: {cache}]", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
