"""Write files into a Hugging Face hub cache exactly as ``huggingface_hub`` lays it out.

The layout (``huggingface_hub.file_download`` docs, "Understand caching" guide; checked against
huggingface_hub 2.4's ``_create_symlink`` / ``repo_folder_name`` / ``_snapshot_download``)::

    <cache_dir>/models--{org}--{name}/
        blobs/<hash>                      file contents, named by their hub etag:
                                          sha256 hex for LFS files (weights), git blob sha1
                                          (sha1 of b"blob <size>\\0" + content) for plain git files
        refs/main                         the commit sha ``main`` points at, no trailing newline
        snapshots/<commit>/<path>         RELATIVE symlinks into blobs/, e.g. a nested path
                                          ``a/b.json`` -> ``../../../blobs/<hash>``

``hf_hub_download(..., local_files_only=True)`` / ``snapshot_download(..., local_files_only=True)``
(and ``HF_HUB_OFFLINE=1``) resolve ``refs/main`` to the commit and read ``snapshots/<commit>/``;
nothing else is needed. Which files are LFS follows the hub's default ``.gitattributes`` (weight and
archive extensions) plus the hub's rule that plain git files cannot exceed 10 MiB.

Commits are synthetic but deterministic: sha1 over the parent commit and the sorted
``(path, blob hash)`` tree, so the same files written onto the same base give the same sha.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from huggingface_hub.file_download import repo_folder_name

from core.store import atomic

__all__ = ["blob_hash", "repo_cache_dir", "read_tree", "write_snapshot"]

# Extensions tracked by LFS in the hub's default .gitattributes (the weight/archive subset).
LFS_SUFFIXES: frozenset[str] = frozenset(
    {
        ".safetensors",
        ".npz",
        ".npy",
        ".bin",
        ".pt",
        ".pth",
        ".ckpt",
        ".h5",
        ".onnx",
        ".msgpack",
        ".pkl",
        ".pickle",
        ".gguf",
        ".model",
        ".arrow",
        ".parquet",
        ".zip",
        ".gz",
        ".tar",
        ".zst",
    }
)
# Files larger than this must be LFS on the hub.
MAX_GIT_FILE_BYTES: int = 10 * 1024 * 1024
_CHUNK = 1 << 20


def repo_cache_dir(cache_dir: Path, repo_id: str) -> Path:
    """``<cache_dir>/models--{org}--{name}``, named by huggingface_hub's ``repo_folder_name``."""
    return Path(cache_dir) / repo_folder_name(repo_id=repo_id, repo_type="model")


def _is_lfs(path: str, size: int) -> bool:
    return Path(path).suffix.lower() in LFS_SUFFIXES or size > MAX_GIT_FILE_BYTES


def blob_hash(path: str, content: bytes | Path) -> str:
    """The hub etag a file at repo path ``path`` would have: sha256 (LFS) or git blob sha1."""
    size = len(content) if isinstance(content, bytes) else Path(content).stat().st_size
    lfs = _is_lfs(path, size)
    h = hashlib.sha256() if lfs else hashlib.sha1(b"blob %d\0" % size)
    if isinstance(content, bytes):
        h.update(content)
    else:
        with open(content, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def _resolve_commit(repo_dir: Path, revision: str) -> str | None:
    ref = repo_dir / "refs" / revision
    if ref.is_file():
        return ref.read_text().strip()
    return revision if (repo_dir / "snapshots" / revision).is_dir() else None


def read_tree(cache_dir: Path, repo_id: str, revision: str = "main") -> dict[str, str]:
    """``{repo path: blob hash}`` of a cached revision (branch or commit sha); empty if absent."""
    repo_dir = repo_cache_dir(cache_dir, repo_id)
    commit = _resolve_commit(repo_dir, revision)
    if commit is None:
        return {}
    snap = repo_dir / "snapshots" / commit
    return {
        p.relative_to(snap).as_posix(): Path(os.readlink(p)).name for p in sorted(snap.rglob("*")) if p.is_symlink()
    }


def _commit_sha(tree: Mapping[str, str], parent: str | None) -> str:
    h = hashlib.sha1(f"parent {parent or ''}\n".encode())
    for path, blob in sorted(tree.items()):
        h.update(f"{path}\0{blob}\n".encode())
    return h.hexdigest()


def _write_blob(blob: Path, content: bytes | Path) -> None:
    if blob.exists():
        return
    with atomic.atomic_path(blob, mode=0o644) as tmp:  # the hub's blobs follow the umask (usually 0644)
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            with open(content, "rb") as src, open(tmp, "wb") as f:
                shutil.copyfileobj(src, f, _CHUNK)


def write_snapshot(
    cache_dir: Path,
    repo_id: str,
    files: Mapping[str, bytes | Path],
    *,
    base: str | None = "main",
) -> str:
    """Add a revision to the cached model repo ``repo_id`` and point ``refs/main`` at it.

    The new tree is the ``base`` revision's tree (a branch name or commit sha; ``None`` or a missing
    revision = empty) overlaid with ``files`` (repo path -> bytes or a file to copy). Blobs are
    written atomically (``core.store.atomic``); older snapshots stay intact. If the overlay
    leaves the base tree unchanged, no revision is made and the base commit is returned
    (re-writing is idempotent).

    Returns the commit sha of the revision ``refs/main`` now points at.
    """
    repo_dir = repo_cache_dir(cache_dir, repo_id)
    parent = _resolve_commit(repo_dir, base) if base is not None else None
    old_tree = read_tree(cache_dir, repo_id, parent) if parent is not None else {}
    contents = {path.strip("/"): content for path, content in files.items()}
    new_blobs = {path: blob_hash(path, content) for path, content in contents.items()}
    tree = {**old_tree, **new_blobs}
    if parent is not None and tree == old_tree:
        commit = parent
    else:
        commit = _commit_sha(tree, parent)
        blobs_dir = repo_dir / "blobs"
        blobs_dir.mkdir(parents=True, exist_ok=True)
        for path, blob in new_blobs.items():
            _write_blob(blobs_dir / blob, contents[path])
        snap = repo_dir / "snapshots" / commit
        for path, blob in tree.items():
            link = snap / path
            link.parent.mkdir(parents=True, exist_ok=True)
            atomic.symlink(os.path.relpath(blobs_dir / blob, link.parent), link)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    atomic.write_text(repo_dir / "refs" / "main", commit)
    return commit
