"""Shared fixtures: the planted releases generated once per session into a temporary hub cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MPLCONFIGDIR", str(Path(__file__).resolve().parents[1] / "data" / "mplconfig"))
# The tests name every cache they read; a planted cache the user's shell points at (scripts/env.sh) must not make
# a release "present" that a test expects missing.
os.environ.pop("WEIGHTLENS_PLANTED_CACHE", None)

import torch  # noqa: E402

from core.testbeds.planted import generate  # noqa: E402
from tests.planted_chain import PLANTED, PLANTED_NULL, materialise_planted  # noqa: E402

TIERS = ("unit", "chain", "system")  # pyproject.toml [tool.pytest.ini_options] markers

if os.environ.get("PYTEST_XDIST_WORKER"):  # scripts/test.sh: one worker per core, so one torch thread each
    torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test carries exactly one tier marker (a module's ``pytestmark``), so ``-m unit`` selects a known set."""
    unmarked = [item.nodeid for item in items if sum(item.get_closest_marker(t) is not None for t in TIERS) != 1]
    if unmarked:
        raise pytest.UsageError(f"tests without exactly one of the markers {TIERS}: {unmarked[:5]}")


@pytest.fixture(scope="session")
def planted_cache(tmp_path_factory) -> Path:
    """A hub cache holding the planted releases and their null twins, in the exact hub layout (read offline)."""
    cache = tmp_path_factory.mktemp("hf-cache")
    for release in PLANTED + PLANTED_NULL:
        generate(release, cache)
    return cache


# core.testbeds.trained overrides that train in seconds (a few dozen steps); the registry's parameters are what
# ``python -m core.testbeds.trained`` trains (README, "Trained releases")
FAST_TRAINED = {"steps": 80, "sae_steps": 60, "sae_positions": 4096, "vocab_size": 512, "d_sae": 256}


@pytest.fixture(scope="session")
def trained_llama(tmp_path_factory):
    """(hub cache, ``core.testbeds.trained.TrainedRelease``) of trained-llama generated with ``FAST_TRAINED``."""
    from core.testbeds.trained import generate as train

    cache = tmp_path_factory.mktemp("trained-hub")
    return cache, train("trained-llama", cache, overrides=FAST_TRAINED)


@pytest.fixture(scope="session")
def chain(planted_cache, tmp_path_factory):
    """(instance, data dir, partition keys) after the whole chain ran on both planted releases."""
    return materialise_planted(planted_cache, tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def null_chain(planted_cache, tmp_path_factory):
    """(instance, data dir, partition keys) after the chain ran on the null twins of the planted releases."""
    return materialise_planted(planted_cache, tmp_path_factory.mktemp("null-data"), PLANTED_NULL)
