"""The asset chain materialised once per test session on both planted releases (fixture ``chain``
in conftest.py), and the resources it runs with."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import dagster as dg

from core.registry import parse_key
from orchestration.cli import materialize_all, register_partitions
from orchestration.resources import ComputeResource, HubResource, StoreResource

PLANTED = ("planted-gemma", "planted-llama")
# The same planted models with SAEs of random directions: every claim must come out not consistent.
PLANTED_NULL = ("planted-gemma-null", "planted-llama-null")
FULL_UP_TO = 6  # releases with at most this many layers are analysed whole


def chain_resources(cache: Path, data: Path, **compute: str | int) -> dict[str, dg.ConfigurableResource]:
    """Offline hub on ``cache``, tables under ``data``, CPU engine with test-sized null samples (and any
    other ``ComputeResource`` settings given)."""
    return {
        "hub": HubResource(cache_dir=str(cache), offline=True),
        "store": StoreResource(data_dir=str(data)),
        "compute": ComputeResource(
            **{"device": "cpu", "null_directions": 512, "circuit_null_directions": 128, **compute}
        ),
    }


def analysed(keys: list[str], releases: Sequence[str] = PLANTED) -> list[str]:
    """Every layer's SAE of each release, less the middle one where a release has more than ``FULL_UP_TO``
    layers: enough layers for the layer-level tests (a permutation test over layer order needs 4; more give
    it power), and a gap the report must name."""
    picked = []
    for release in releases:
        ordered = sorted((k for k in keys if k.startswith(f"{release}:")), key=lambda k: parse_key(k).layer)
        middle = len(ordered) // 2
        picked += ordered if len(ordered) <= FULL_UP_TO else ordered[:middle] + ordered[middle + 1 :]
    return picked


def materialise_planted(
    cache: Path, data: Path, releases: Sequence[str] = PLANTED, **compute: str | int
) -> tuple[dg.DagsterInstance, Path, list[str]]:
    """Register every SAE of the planted ``releases`` as a partition of an ephemeral instance and
    materialise every asset for the ``analysed`` ones with ``chain_resources(cache, data, **compute)``;
    returns (instance, data dir, analysed keys)."""
    resources = chain_resources(cache, data, **compute)
    instance = dg.DagsterInstance.ephemeral()
    keys = analysed(register_partitions(instance, releases, resources["hub"]), releases)
    materialize_all(instance, keys, resources)
    return instance, data, keys
