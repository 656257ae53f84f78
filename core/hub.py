"""Hugging Face hub access: the only place that downloads, always into the standard hub cache.

Downloads go through ``huggingface_hub.snapshot_download`` with ``allow_patterns`` so only the files
named are fetched. The token comes from ``HF_TOKEN`` or ``hf auth login`` (huggingface_hub reads it;
this module never touches or logs it). Offline — ``HF_HUB_OFFLINE=1`` or ``offline=True`` — the same
calls read the cache only (``local_files_only``), which is how the planted releases and the tests work.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile

from core.errors import HubError


def offline_from_env() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for cache-only access (read at call time, not import time)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Snapshot:
    """Files of one repository revision in the hub cache."""

    repo_id: str
    revision: str  # the commit sha the files belong to
    root: Path  # .../models--org--name/snapshots/<revision>

    def path(self, filename: str) -> Path:
        """Local path of a file of this snapshot (which may not have been downloaded)."""
        return self.root / filename

    def files(self) -> list[str]:
        """Repository paths of the files present locally, sorted."""
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())


@dataclass(frozen=True)
class Hub:
    """Where and how to fetch: a cache directory (None = huggingface_hub's default) and online/offline."""

    cache_dir: Path | None = None
    offline: bool | None = None  # None: follow HF_HUB_OFFLINE

    @property
    def is_offline(self) -> bool:
        return offline_from_env() if self.offline is None else self.offline

    def fetch(self, repo_id: str, patterns: list[str], revision: str | None = None) -> Snapshot:
        """Download (or, offline, find in the cache) the files of ``repo_id`` matching ``patterns``.

        Raises HubError with an actionable message for a missing cache entry offline, a gated or
        unknown repository and an unknown revision.
        """
        where = self.cache_dir or "the default hub cache"
        try:
            root = snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=patterns,
                cache_dir=self.cache_dir,
                local_files_only=self.is_offline,
            )
        except GatedRepoError as exc:
            raise HubError(
                f"{repo_id} is gated: accept its licence on the hub, then set HF_TOKEN or run "
                "`hf auth login` (the token is read by huggingface_hub and never stored here)"
            ) from exc
        except RevisionNotFoundError as exc:
            raise HubError(f"{repo_id}: revision {revision!r} not found on the hub") from exc
        except RepositoryNotFoundError as exc:
            raise HubError(f"{repo_id}: repository not found (or private without a token)") from exc
        except LocalEntryNotFoundError as exc:
            raise HubError(
                f"{repo_id} (revision {revision or 'main'}) is not in {where} and the hub is not "
                "reachable or offline mode is on (HF_HUB_OFFLINE=1). Download it once online, or for the "
                "planted releases run `python -m core.planted`."
            ) from exc
        snapshot = Snapshot(repo_id=repo_id, revision=Path(root).name, root=Path(root))
        missing = [p for p in patterns if "*" not in p and not snapshot.path(p).is_file()]
        if missing:
            raise HubError(f"{repo_id}@{snapshot.revision}: files not in the repository: {missing}")
        return snapshot

    def list_blobs(self, repo_id: str, revision: str | None = None) -> tuple[str, dict[str, str]]:
        """(commit sha, {path: content id}) of a repository revision, from the hub or, offline, the cache.

        The content id is what the cache names the file's blob: the sha256 for LFS files, the git blob
        sha1 otherwise — so online and offline listings of the same revision agree, and a file whose
        id is unchanged has unchanged bytes."""
        if self.is_offline:
            snapshot = self.fetch(repo_id, [], revision)  # resolves the ref in the cache only
            return snapshot.revision, {path: file_fingerprint(snapshot.path(path)) for path in snapshot.files()}
        api = HfApi()
        try:
            sha = str(api.model_info(repo_id, revision=revision).sha)
            tree = api.list_repo_tree(repo_id, recursive=True, revision=sha)
            blobs = {f.path: (f.lfs.sha256 if f.lfs else f.blob_id) for f in tree if isinstance(f, RepoFile)}
        except GatedRepoError as exc:
            raise HubError(f"{repo_id} is gated: set HF_TOKEN or run `hf auth login`") from exc
        except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise HubError(f"{repo_id}@{revision or 'main'}: not found on the hub") from exc
        except Exception as exc:  # noqa: BLE001 — transport errors (the hub client's own types, not OSError)
            raise HubError(f"{repo_id}: the hub is not reachable ({type(exc).__name__}: {exc})") from exc
        return sha, blobs

def file_fingerprint(path: Path) -> str:
    """Content hash of a cached file: the blob name when ``path`` is a hub-cache symlink (the hub names
    LFS blobs by their sha256 and small files by their git sha1), otherwise a sha256 of the bytes."""
    if path.is_symlink():
        return Path(os.readlink(path)).name
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_id(ids: Iterable[str]) -> str:
    """One short, order-independent hash over several content ids."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def fingerprint(paths: Iterable[Path]) -> str:
    """``content_id`` of local files: equal to the same files' ids in a hub listing (``list_blobs``)."""
    return content_id(file_fingerprint(p) for p in paths)
