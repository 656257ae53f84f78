"""Ground truth of a planted release, read back like any other file: from the SAE repo in the hub cache.

``planted_truth.json`` (written by ``core.testbeds.planted``) lists per SAE id the planted semantic features —
those whose decoder direction writes a coherent token group through the final norm and unembedding
(so they directly predict output tokens) and whose encoder reads another group's embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.registry import get_release
from core.weights.discovery import hub_for
from core.weights.hub import Hub
from core.weights.sae_formats import read_json

TRUTH_FILE = "planted_truth.json"


@dataclass(frozen=True)
class GroundTruth:
    """A planted release's ground truth: ``data`` is its ``planted_truth.json`` (``core.testbeds.planted`` writes
    it)."""

    release: str
    data: dict[str, Any]


def planted_semantic_features(data: dict[str, Any]) -> dict[str, set[int]]:
    """Planted semantic (output-predicting) feature indices per SAE id, from planted_truth.json's data."""
    return {sae_id: {int(f["index"]) for f in sae["semantic_features"]} for sae_id, sae in data["saes"].items()}


def load_truth(release_id: str, hub: Hub) -> GroundTruth:
    """The planted truth of a planted release (its SAE repo's ``planted_truth.json``)."""
    release = get_release(release_id)
    if not release.planted:
        raise ValueError(f"{release_id} is not a planted release: it has no ground truth")
    snapshot = hub_for(release, hub).fetch(release.sae_repo, [TRUTH_FILE])
    return GroundTruth(release=release.id, data=read_json(snapshot.path(TRUTH_FILE)))
