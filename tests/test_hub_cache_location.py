"""Which hub cache each release is read from: real releases from huggingface_hub's own cache (shared with every
other tool, so a model the user has is not downloaded again), the planted releases from a cache of their own
(``WEIGHTLENS_PLANTED_CACHE``, ``scripts/env.sh``: ``<data dir>/planted-hub``) that hides nothing of the user's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants

from core.errors import HubError
from core.registry import get_release
from core.testbeds.planted import generate
from core.weights.hub import Hub
from core.weights.hub_cache import repo_cache_dir, write_snapshot
from orchestration.resources import PLANTED_CACHE_ENV, HubResource

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[1]
PLANTED = get_release("planted-gemma")
REAL_REPO = "google/gemma-scope-2b-pt-res"


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This process's environment without hub or project locations: a user's fresh shell, homed in tmp_path."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "HUGGING", "WEIGHTLENS_", "DAGSTER_", "MPLCONFIGDIR"))
    }
    return {
        **env,
        "HOME": str(tmp_path / "home"),
        "HF_HOME": str(tmp_path / "hf-home"),
        "WEIGHTLENS_DATA_DIR": str(tmp_path / "data"),
        **extra,
    }


def sourced(env: dict[str, str], command: str) -> str:
    """stdout of ``command`` run after ``source scripts/env.sh``."""
    proc = subprocess.run(
        ["bash", "-c", f"source scripts/env.sh && {command}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_env_sh_keeps_huggingface_hubs_cache_and_gives_the_planted_releases_their_own(tmp_path):
    hub_cache = 'python -c "from huggingface_hub import constants; print(constants.HF_HUB_CACHE)"'
    show = f'echo "${{HF_HUB_CACHE-unset}}|$WEIGHTLENS_PLANTED_CACHE|$({hub_cache})"'
    assert (
        sourced(clean_env(tmp_path), show).strip()
        == f"unset|{tmp_path / 'data' / 'planted-hub'}|{tmp_path / 'hf-home' / 'hub'}"
    )
    mine = clean_env(tmp_path, HF_HUB_CACHE=str(tmp_path / "mine"), WEIGHTLENS_PLANTED_CACHE=str(tmp_path / "p"))
    assert sourced(mine, show).strip() == f"{tmp_path / 'mine'}|{tmp_path / 'p'}|{tmp_path / 'mine'}"


@pytest.fixture
def caches(tmp_path) -> tuple[Path, Path]:
    """(the user's hub cache holding a real release, a planted cache holding planted-gemma's SAE repo)."""
    hub_cache, planted = tmp_path / "hub-cache", tmp_path / "planted-hub"
    write_snapshot(hub_cache, REAL_REPO, {"marker.txt": b"real"})
    write_snapshot(planted, PLANTED.sae_repo, {"marker.txt": b"planted"})
    return hub_cache, planted


def marker(hub: Hub, repo: str) -> bytes:
    return hub.fetch(repo, ["marker.txt"]).path("marker.txt").read_bytes()


def test_each_repository_comes_from_its_cache_and_neither_cache_gets_the_others(caches, monkeypatch):
    hub_cache, planted = caches
    monkeypatch.setenv(PLANTED_CACHE_ENV, str(planted))
    hub = HubResource(cache_dir=str(hub_cache), offline=True).client()
    assert (marker(hub, REAL_REPO), marker(hub, PLANTED.sae_repo)) == (b"real", b"planted")
    assert not repo_cache_dir(hub_cache, PLANTED.sae_repo).exists()
    assert not repo_cache_dir(planted, REAL_REPO).exists()
    with pytest.raises(HubError, match="is not in"):  # a real repository is never looked for in the planted cache
        marker(HubResource(cache_dir=str(planted), planted_cache_dir=str(hub_cache), offline=True).client(), REAL_REPO)


def test_huggingface_hubs_default_cache_is_the_hub_cache_when_none_is_configured(caches, monkeypatch):
    hub_cache, planted = caches
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))  # what HF_HOME / HF_HUB_CACHE resolved to
    hub = HubResource(offline=True, planted_cache_dir=str(planted)).client()
    assert (marker(hub, REAL_REPO), marker(hub, PLANTED.sae_repo)) == (b"real", b"planted")


def test_a_hub_cache_that_holds_a_planted_repository_is_read_first(caches, monkeypatch):
    """A cache filled with the planted releases on purpose (the tests', or ``core.testbeds.planted --cache-dir`` pointed
    at the hub cache) keeps working as before the planted cache existed."""
    hub_cache, planted = caches
    write_snapshot(hub_cache, PLANTED.sae_repo, {"marker.txt": b"hub cache's own"})
    monkeypatch.setenv(PLANTED_CACHE_ENV, str(planted))
    assert marker(HubResource(cache_dir=str(hub_cache), offline=True).client(), PLANTED.sae_repo) == b"hub cache's own"


def test_a_missing_planted_release_names_both_caches_and_how_to_generate_it(tmp_path):
    hub = HubResource(
        cache_dir=str(tmp_path / "hub-cache"), planted_cache_dir=str(tmp_path / "planted"), offline=True
    ).client()
    with pytest.raises(HubError) as error:
        hub.fetch(PLANTED.sae_repo, ["marker.txt"])
    message = str(error.value)
    assert f"is not in {tmp_path / 'hub-cache'} nor in the planted releases' cache {tmp_path / 'planted'} " in message
    assert f"python -m core.testbeds.planted --cache-dir {tmp_path / 'planted'}" in message


def test_the_cli_in_a_fresh_shell_finds_the_planted_release_and_leaves_the_users_cache_alone(tmp_path):
    """What a user does after ``scripts/demo.sh``: source env.sh, run the CLI. huggingface_hub's cache is the
    user's ($HF_HOME/hub); the planted release is found in data/planted-hub, and nothing is written to the former."""
    env = clean_env(tmp_path, HF_HUB_OFFLINE="1")
    generate(PLANTED.id, tmp_path / "data" / "planted-hub", layers=[0])
    out = sourced(env, f"{sys.executable} -m orchestration.cli materialize {PLANTED.id} --dry-run")
    assert f"would run {PLANTED.id}:layer_0/" in out
    assert not (tmp_path / "hf-home" / "hub").exists() or not any((tmp_path / "hf-home" / "hub").iterdir())
