"""What changed in the tracked releases since their SAEs were last materialised.

The state of an SAE is two content ids: its own files' (``ReleaseListing.sae_fingerprint``, recorded as
the ``sae_weights`` data version) and its model repository's revision (recorded by ``model_weights``).
Comparing the hub's (or the cache's) current state with what was recorded needs no cursor of its own,
so the sensor, the schedule and a manual check agree, and SAEs materialised by any route count.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from core.errors import HubError, WeightFileError
from core.registry import Release, UnknownReleaseError, load_registry
from core.weights.discovery import discover_saes, hub_for
from core.weights.hub import Hub


@dataclass(frozen=True)
class SaeState:
    sae_fingerprint: str
    model_revision: str


@dataclass
class Plan:
    """What a check found: partitions to add, partitions to (re)compute and why, releases it could not
    check (with the reason)."""

    new: list[str] = field(default_factory=list)
    changed: dict[str, str] = field(default_factory=dict)  # key -> what changed
    problems: list[str] = field(default_factory=list)
    checked: int = 0

    @property
    def to_run(self) -> list[str]:
        return [*self.new, *self.changed]


def tracked_releases() -> list[Release]:
    """Registry entries with ``track: true`` — the ones the sensor and schedule watch."""
    return [r for r in load_registry().values() if r.track]


def current_states(release: Release, hub: Hub) -> dict[str, SaeState]:
    """Current state of every SAE of a release, from one listing of its SAE and model repositories."""
    listing = discover_saes(release.id, hub)
    model_revision, _ = hub_for(release, hub).list_blobs(release.model_repo)
    return {ref.key: SaeState(listing.sae_fingerprint(ref), model_revision) for ref in listing.saes}


def plan_refresh(
    releases: list[Release],
    hub: Hub,
    known_partitions: set[str],
    recorded: Callable[[str], SaeState | None],
) -> Plan:
    """Compare each tracked SAE with what was recorded at its last materialisation (``recorded(key)``,
    None when never materialised). Hub or cache failures become ``problems`` (the release is skipped),
    never exceptions."""
    plan = Plan()
    for release in releases:
        try:
            states = current_states(release, hub)
        except (HubError, WeightFileError, UnknownReleaseError) as exc:
            plan.problems.append(f"{release.id}: {exc}")
            continue
        for key, state in states.items():
            plan.checked += 1
            before = recorded(key)
            if key not in known_partitions or before is None:
                plan.new.append(key)
            elif before != state:
                what = [n for n in ("sae_fingerprint", "model_revision") if getattr(before, n) != getattr(state, n)]
                plan.changed[key] = ", ".join(what)
    return plan


def describe(plan: Plan) -> str:
    """One line for a tick's log or skip reason."""
    parts = [f"checked {plan.checked} SAEs", f"{len(plan.new)} new", f"{len(plan.changed)} changed"]
    return "; ".join(parts) + ("; could not check: " + " | ".join(plan.problems) if plan.problems else "")


def as_mapping(plan: Plan) -> Mapping[str, object]:
    return {"new": plan.new, "changed": plan.changed, "problems": plan.problems, "checked": plan.checked}
