"""The online hub path for real: ``core.weights.hub`` -> huggingface_hub -> HTTP -> a fake hub on 127.0.0.1.

huggingface_hub reads ``HF_ENDPOINT`` at import time and this test process has imported it already, so
every online call runs in a child process started with ``HF_ENDPOINT`` (the fake hub), ``HF_HUB_CACHE``
(a fresh client cache), its own ``HF_HOME``, ``HF_DEBUG=1`` (curl-style request logs, to check what
is logged) and, where a test says so, ``HF_TOKEN``. Offline reads and the source cache stay in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from core.errors import HubError
from core.testbeds.planted import generate
from core.weights.discovery import discover_saes
from core.weights.hub import Hub
from core.weights.hub_cache import read_tree, repo_cache_dir, write_snapshot
from tests.fake_hub import FakeHub

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[1]
SAE_REPO = "planted/gemma-scope-tiny-pt-res"
MODEL_REPO = "planted/gemma-2-tiny"
SAE_FILES = ["layer_0/width_512/average_l0_32/params.npz", "planted_truth.json"]  # LFS + plain git file
TOKEN = "hf_CANARY_9f3c2a7e1b5d4c6a8e0f"
WRONG_TOKEN = "hf_CANARY_WRONG_0d1e2f3a4b5c"
PRELUDE = """
import json, os
from pathlib import Path
from core.errors import HubError
from core.weights.hub import Hub
HUB = Hub(cache_dir=Path(os.environ["HF_HUB_CACHE"]), offline=False)
def attempt(call):
    try:
        return {"ok": call()}
    except HubError as exc:
        return {"error": str(exc)}
"""


def run_client(endpoint: str, cache: Path, code: str, token: str | None = None) -> tuple[Any, str]:
    """Run ``code`` (which sets ``result``) in a fresh interpreter pointed at ``endpoint``; returns
    (result as JSON, everything the process printed or logged)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HUB_CACHE=str(cache),
        HF_HOME=str(cache.parent / "hf-home"),
        HF_DEBUG="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    if token is not None:
        env["HF_TOKEN"] = token
    script = PRELUDE + code + '\nprint("RESULT " + json.dumps(result))\n'
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    line = next(line for line in reversed(proc.stdout.splitlines()) if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :]), output


def cached_bytes(cache: Path, repo: str, revision: str = "main") -> dict[str, bytes]:
    """{path: bytes} of a cached revision, read through its snapshot links."""
    blobs = repo_cache_dir(cache, repo) / "blobs"
    return {path: (blobs / blob).read_bytes() for path, blob in read_tree(cache, repo, revision).items()}


def commit_of(cache: Path, repo: str) -> str:
    return (repo_cache_dir(cache, repo) / "refs" / "main").read_text()


def resolve_requests(hub: FakeHub) -> list[str]:
    return [r.path for r in hub.requests if "/resolve/" in r.path]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hub's side: planted-gemma (layers 0 and 1) written into a hub cache."""
    cache = tmp_path_factory.mktemp("source")
    generate("planted-gemma", cache, layers=[0, 1])
    return cache


def test_fetch_downloads_only_allowed_files_then_reads_them_offline(source: Path, tmp_path: Path) -> None:
    client = tmp_path / "cache"
    with FakeHub(source) as hub:
        result, _ = run_client(
            hub.url,
            client,
            f"""
result = {{repo: [s.revision, s.files()] for repo, s in (
    ({SAE_REPO!r}, HUB.fetch({SAE_REPO!r}, {SAE_FILES!r})),
    ({MODEL_REPO!r}, HUB.fetch({MODEL_REPO!r}, ["*.json"])),
)}}
""",
        )
    json_files = sorted(p for p in read_tree(source, MODEL_REPO) if p.endswith(".json"))
    expected = {SAE_REPO: SAE_FILES, MODEL_REPO: json_files}
    for repo, files in expected.items():
        commit = commit_of(source, repo)
        assert result[repo] == [commit, files]
        assert commit_of(client, repo) == commit  # refs/main written, as huggingface_hub does
        source_tree = read_tree(source, repo)
        assert read_tree(client, repo) == {p: source_tree[p] for p in files}  # blobs named by the hub etag
        assert cached_bytes(client, repo) == {p: b for p, b in cached_bytes(source, repo).items() if p in files}
        snapshot = repo_cache_dir(client, repo) / "snapshots" / commit
        assert all(not os.path.isabs(os.readlink(snapshot / p)) for p in files)  # relative links into blobs/
        blobs = sorted(p.name for p in (repo_cache_dir(client, repo) / "blobs").iterdir())
        assert blobs == sorted(source_tree[p] for p in files)  # nothing else, no leftover .incomplete
    lfs_gets = [r.path for r in hub.requests if r.server == "cdn" and r.method == "GET"]
    assert lfs_gets == [f"/{SAE_REPO}/{read_tree(source, SAE_REPO)[SAE_FILES[0]]}"]  # weights via the 302
    assert not any("layer_1" in path for path in resolve_requests(hub))

    # The server is gone: offline, the same fetch is served by the cache alone.
    for repo, patterns in ((SAE_REPO, SAE_FILES), (MODEL_REPO, ["*.json"])):
        snapshot = Hub(cache_dir=client, offline=True).fetch(repo, patterns)
        assert [snapshot.revision, snapshot.files()] == [commit_of(source, repo), expected[repo]]
    with pytest.raises(HubError, match="is not in"):  # never downloaded, and the hub is not asked
        Hub(cache_dir=client, offline=True).fetch(SAE_REPO, ["layer_1/width_512/average_l0_32/params.npz"])


def test_list_blobs_online_equals_offline_listing(source: Path, tmp_path: Path) -> None:
    with FakeHub(source, page_size=2) as hub:  # small pages: the tree listing follows Link headers
        online, _ = run_client(
            hub.url,
            tmp_path / "cache",
            f"""
result = {{repo: HUB.list_blobs(repo) for repo in ({SAE_REPO!r}, {MODEL_REPO!r})}}
""",
        )
    assert any("cursor=" in r.path for r in hub.requests if "/tree/" in r.path)
    assert resolve_requests(hub) == []  # a listing downloads nothing
    for repo in (SAE_REPO, MODEL_REPO):
        sha, blobs = Hub(cache_dir=source, offline=True).list_blobs(repo)
        assert online[repo] == [sha, blobs]
        assert sha == commit_of(source, repo)


def test_gated_repo_needs_the_token_which_is_never_revealed(source: Path, tmp_path: Path) -> None:
    shards = sorted(p.name for p in source.glob("models--planted--gemma-2-tiny/snapshots/*/model-*.safetensors"))
    patterns = ["config.json", shards[-1]]  # one shard of several: only what was asked for is fetched
    code = f"result = attempt(lambda: HUB.fetch({MODEL_REPO!r}, {patterns!r}).files())"
    logs = []
    with FakeHub(source, gated={MODEL_REPO}, token=TOKEN) as hub:
        for name, token in (("none", None), ("wrong", WRONG_TOKEN), ("right", TOKEN)):
            result, output = run_client(hub.url, tmp_path / name / "cache", code, token=token)
            logs.append(output)
            if name == "right":
                assert result == {"ok": patterns}
            else:
                assert "gated" in result["error"] and "HF_TOKEN" in result["error"]
                assert TOKEN not in result["error"] and WRONG_TOKEN not in result["error"]
    assert cached_bytes(tmp_path / "right" / "cache", MODEL_REPO) == {
        p: b for p, b in cached_bytes(source, MODEL_REPO).items() if p in patterns
    }
    sent = {r.headers.get("authorization") for r in hub.requests if "/resolve/" in r.path}
    assert sent == {None, f"Bearer {WRONG_TOKEN}", f"Bearer {TOKEN}"}  # each client sent what it had
    assert [r.headers.get("authorization") for r in hub.requests if r.server == "cdn"] == [None]  # not off-hub
    for secret in (TOKEN, WRONG_TOKEN):
        assert not any(secret in output for output in logs)
        written = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()]
        assert written and not any(secret.encode() in p.read_bytes() for p in written)


def test_unknown_revision_and_repository(source: Path, tmp_path: Path) -> None:
    with FakeHub(source) as hub:
        result, _ = run_client(
            hub.url,
            tmp_path / "cache",
            f"""
result = [attempt(lambda: HUB.fetch({SAE_REPO!r}, ["planted_truth.json"], revision=rev).revision)
          for rev in ("no-such-branch", "0" * 40)]
result += [attempt(lambda: HUB.fetch("planted/no-such-repo", ["config.json"]).revision),
           attempt(lambda: HUB.list_blobs({SAE_REPO!r}, "no-such-branch")),
           attempt(lambda: HUB.list_blobs("planted/no-such-repo")),
           attempt(lambda: HUB.fetch({SAE_REPO!r}, ["no-such-file.json"]).revision)]
""",
        )
    errors = [r.get("error", r) for r in result]
    assert "revision 'no-such-branch' not found" in errors[0]
    assert f"revision '{'0' * 40}' not found" in errors[1]
    assert "planted/no-such-repo" in errors[2] and "not found" in errors[2]
    assert f"{SAE_REPO}@no-such-branch: not found" in errors[3]
    assert "planted/no-such-repo" in errors[4] and "not found" in errors[4]
    assert "files not in the repository: ['no-such-file.json']" in errors[5]


def test_unreachable_hub_is_a_hub_error(source: Path, tmp_path: Path) -> None:
    with FakeHub(source) as hub:
        endpoint = hub.url
    result, _ = run_client(
        endpoint,
        tmp_path / "cache",
        f"""
try:
    result = [attempt(lambda: HUB.fetch({SAE_REPO!r}, ["planted_truth.json"]).revision),
              attempt(lambda: HUB.list_blobs({SAE_REPO!r}))]
except Exception as exc:
    result = [type(exc).__module__ + "." + type(exc).__name__]
""",
    )
    assert len(result) == 2, result
    assert "is not in" in result[0]["error"] and "not reachable" in result[1]["error"]


def test_planted_releases_never_ask_the_hub(source: Path, tmp_path: Path) -> None:
    """The release sensor, online: the planted releases are read from the local cache only."""
    client = tmp_path / "cache"
    shutil.copytree(source, client, symlinks=True)
    with FakeHub(source) as hub:
        result, _ = run_client(
            hub.url,
            client,
            """
import dagster as dg
from orchestration.resources import HubResource
from orchestration.sensors import sae_release_sensor
context = dg.build_sensor_context(instance=dg.DagsterInstance.ephemeral(),
                                  resources={"hub": HubResource(cache_dir=str(HUB.cache_dir), offline=False)})
result = sorted(r.partition_key for r in sae_release_sensor(context).run_requests)
""",
        )
    assert result == [f"planted-gemma:layer_{layer}/width_512/average_l0_32" for layer in (0, 1)]
    assert hub.requests == []


RELEASE_CODE = """
from core.weights.discovery import discover_saes, fetch_sae
from core.weights.hub import fingerprint
from core.registry import get_release
from core.release_watch import current_states
listing = discover_saes("gemma-scope-2b-pt-res", HUB)
first = listing.saes[0]
snapshot = fetch_sae(first, HUB)
result = {
    "revision": listing.revision,
    "saes": [ref.key for ref in listing.saes],
    "states": {k: [s.sae_fingerprint, s.model_revision]
               for k, s in current_states(get_release("gemma-scope-2b-pt-res"), HUB).items()},
    "downloaded": [first.key, fingerprint([snapshot.path(f"{first.folder}/params.npz")])],
}
"""


def test_release_growth_is_seen_online(tmp_path: Path) -> None:
    """A real release's layout served by the hub: its SAEs, their fingerprints, and a new SAE appearing."""
    source = tmp_path / "source"
    sae_repo, model_repo = "google/gemma-scope-2b-pt-res", "google/gemma-2-2b"
    folders = ["layer_3/width_16k/average_l0_41", "layer_12/width_16k/average_l0_82"]
    write_snapshot(source, sae_repo, {f"{f}/params.npz": f"weights of {f}".encode() for f in folders})
    model_commit = write_snapshot(source, model_repo, {"config.json": b'{"model_type": "gemma2"}'})
    keys = [f"gemma-scope-2b-pt-res:{f}" for f in folders]
    with FakeHub(source, gated={model_repo}) as hub:  # listing a gated repo needs no token, as on the hub
        before, _ = run_client(hub.url, tmp_path / "cache1", RELEASE_CODE)
        new_folder = "layer_20/width_16k/average_l0_64"
        write_snapshot(source, sae_repo, {f"{new_folder}/params.npz": b"weights of the new SAE"})
        after, _ = run_client(hub.url, tmp_path / "cache2", RELEASE_CODE)

    offline = discover_saes("gemma-scope-2b-pt-res", Hub(cache_dir=source, offline=True))
    assert after["revision"] == offline.revision == commit_of(source, sae_repo) != before["revision"]
    assert after["saes"] == [ref.key for ref in offline.saes] == [*keys, f"gemma-scope-2b-pt-res:{new_folder}"]
    assert before["saes"] == keys
    assert {k: s[0] for k, s in after["states"].items()} == {r.key: offline.sae_fingerprint(r) for r in offline.saes}
    assert {k: after["states"][k] for k in keys} == before["states"]  # unchanged SAEs: same state
    assert {s[1] for s in after["states"].values()} == {model_commit}
    assert before["downloaded"] == [keys[0], before["states"][keys[0]][0]]  # listing id == downloaded files' id
