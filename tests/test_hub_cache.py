"""core.weights.hub_cache writes a cache that huggingface_hub itself reads offline."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import hf_hub_download, scan_cache_dir, snapshot_download

from core.weights.hub_cache import blob_hash, read_tree, repo_cache_dir, write_snapshot

pytestmark = pytest.mark.unit

REPO = "org-x/tiny-repo"


@pytest.fixture
def weights_file(tmp_path: Path) -> Path:
    path = tmp_path / "src.npz"
    path.write_bytes(os.urandom(3000))
    return path


def _files(weights_file: Path) -> dict[str, bytes | Path]:
    return {
        "config.json": b'{"a": 1}',
        "layer_0/width_16/params.safetensors": b"\x00weights" * 100,
        "a/b/c/deep.npz": weights_file,
    }


def test_layout_matches_the_hub(tmp_path: Path, weights_file: Path) -> None:
    cache = tmp_path / "hub"
    sha = write_snapshot(cache, REPO, _files(weights_file))
    repo = cache / "models--org-x--tiny-repo"
    assert repo_cache_dir(cache, REPO) == repo
    assert len(sha) == 40 and int(sha, 16) >= 0
    assert (repo / "refs" / "main").read_bytes() == sha.encode()  # no trailing newline
    snap = repo / "snapshots" / sha
    # small text file: git blob sha1; weights: sha256 of the content
    cfg_blob = hashlib.sha1(b"blob 8\0" + b'{"a": 1}').hexdigest()
    assert os.readlink(snap / "config.json") == f"../../blobs/{cfg_blob}"
    deep_blob = hashlib.sha256(weights_file.read_bytes()).hexdigest()
    assert os.readlink(snap / "a/b/c/deep.npz") == f"../../../../../blobs/{deep_blob}"
    assert (snap / "a/b/c/deep.npz").resolve() == (repo / "blobs" / deep_blob).resolve()
    assert not any(p.name.startswith(".") for p in (repo / "blobs").iterdir())  # no temp files left


def test_git_blob_hash_matches_git() -> None:
    assert blob_hash("x.txt", b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
    assert blob_hash("x.txt", b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"
    assert blob_hash("x.safetensors", b"") == hashlib.sha256(b"").hexdigest()


def test_hf_hub_download_and_snapshot_download_read_it(tmp_path: Path, weights_file: Path) -> None:
    cache = tmp_path / "hub"
    files = _files(weights_file)
    sha = write_snapshot(cache, REPO, files)
    for path, content in files.items():
        got = hf_hub_download(REPO, path, cache_dir=cache, local_files_only=True)
        expected = content if isinstance(content, bytes) else content.read_bytes()
        assert Path(got).read_bytes() == expected
    snap = snapshot_download(REPO, cache_dir=cache, local_files_only=True)
    assert Path(snap) == repo_cache_dir(cache, REPO) / "snapshots" / sha
    assert sorted(p.relative_to(snap).as_posix() for p in Path(snap).rglob("*") if p.is_file()) == sorted(files)


def test_hf_hub_offline_env_reads_it(tmp_path: Path, weights_file: Path) -> None:
    cache = tmp_path / "hub"
    write_snapshot(cache, REPO, _files(weights_file))
    code = (
        "from huggingface_hub import hf_hub_download, snapshot_download\n"
        f"print(open(hf_hub_download({REPO!r}, 'config.json')).read())\n"
        f"print(snapshot_download({REPO!r}))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0] == '{"a": 1}'
    assert Path(out[1]).parent == repo_cache_dir(cache, REPO) / "snapshots"


def test_second_revision_overlays_base_and_keeps_first(tmp_path: Path, weights_file: Path) -> None:
    cache = tmp_path / "hub"
    first = write_snapshot(cache, REPO, _files(weights_file))
    second = write_snapshot(cache, REPO, {"config.json": b'{"a": 2}', "new/file.json": b"[]"})
    assert second != first
    repo = repo_cache_dir(cache, REPO)
    assert (repo / "refs" / "main").read_text() == second
    assert sorted(p.name for p in (repo / "snapshots").iterdir()) == sorted([first, second])
    assert read_tree(cache, REPO, first).keys() < read_tree(cache, REPO).keys()
    old = hf_hub_download(REPO, "config.json", revision=first, cache_dir=cache, local_files_only=True)
    new = hf_hub_download(REPO, "config.json", cache_dir=cache, local_files_only=True)
    assert Path(old).read_bytes() == b'{"a": 1}' and Path(new).read_bytes() == b'{"a": 2}'
    kept = hf_hub_download(REPO, "a/b/c/deep.npz", cache_dir=cache, local_files_only=True)
    assert Path(kept).read_bytes() == weights_file.read_bytes()
    scan = scan_cache_dir(cache)  # the hub's own cache scanner sees a clean repo, 2 revisions
    assert not scan.warnings
    (info,) = scan.repos
    assert info.repo_id == REPO and info.refs["main"].commit_hash == second
    assert {r.commit_hash for r in info.revisions} == {first, second}
    fresh = write_snapshot(cache, REPO, {"only.json": b"{}"}, base=None)
    assert list(read_tree(cache, REPO)) == ["only.json"] and fresh not in (first, second)


def test_deterministic_and_idempotent(tmp_path: Path, weights_file: Path) -> None:
    a = write_snapshot(tmp_path / "a", REPO, _files(weights_file))
    b = write_snapshot(tmp_path / "b", REPO, _files(weights_file))
    assert a == b
    assert write_snapshot(tmp_path / "a", REPO, {"config.json": b'{"a": 1}'}) == a  # no-op overlay
    assert len(list((repo_cache_dir(tmp_path / "a", REPO) / "snapshots").iterdir())) == 1
