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
# Under pytest-xdist (scripts/test.sh) each module runs whole on one worker; these modules share a session fixture
# of minutes with another one (``chain`` / ``null_chain``, ``trained_llama``), so they run on that module's worker
# and the fixture is built once.
SAME_WORKER = {"test_claims_planted.py": "test_chain.py", "test_peer_saelens.py": "test_trained.py"}
# The modules of minutes, longest first (measured): the workers start on them, so no long module is left for the
# end while the other worker idles; the rest follow in file order.
LONGEST_FIRST = (
    "test_chain.py",
    "test_claims_planted.py",
    "test_invariance.py",
    "test_cluster.py",
    "test_reliability.py",
    "test_trained.py",
    "test_peer_saelens.py",
    "test_gpu_check.py",
    "test_negative_controls.py",
    "test_cli.py",
    "test_ui_browser.py",
    "test_freshness.py",
)

if os.environ.get("PYTEST_XDIST_WORKER"):  # scripts/test.sh: one worker per core, so one torch thread each
    torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test carries exactly one tier marker (a module's ``pytestmark``), so ``-m unit`` selects a known set;
    the modules of ``LONGEST_FIRST`` are run first, in that order (a stable sort: within a module, file order)."""
    unmarked = [item.nodeid for item in items if sum(item.get_closest_marker(t) is not None for t in TIERS) != 1]
    if unmarked:
        raise pytest.UsageError(f"tests without exactly one of the markers {TIERS}: {unmarked[:5]}")
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """xdist's module-at-a-time scheduling (``--dist loadfile``), with the modules of ``SAME_WORKER`` in one unit and
    the units handed out in collection order (``LONGEST_FIRST``) instead of by their number of tests."""
    from xdist.scheduler import LoadFileScheduling

    class SharedFixtureScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = super()._split_scope(nodeid)
            path = Path(module)
            return str(path.with_name(SAME_WORKER.get(path.name, path.name)))

    config.option.loadscopereorder = False
    return SharedFixtureScheduling(config, log)


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
