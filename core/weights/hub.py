"""Hugging Face hub access: the only place that downloads, always into the standard hub cache.

Downloads go through ``huggingface_hub.snapshot_download`` with ``allow_patterns`` so only the files
named are fetched. The token comes from ``HF_TOKEN`` or ``hf auth login`` (huggingface_hub reads it;
this module never touches or logs it). Offline — ``HF_HUB_OFFLINE=1`` or ``offline=True`` — the same
calls read the cache only (``local_files_only``), which is how the planted releases and the tests work.

Two caches: the hub cache (``cache_dir``; None = huggingface_hub's own, shared with every other tool, so
weights a user already has are not downloaded again) and, optionally, a cache for the planted releases
(``planted_cache_dir``), which ``core.testbeds.planted`` generates and which exist on no hub. Keeping them apart
means the hub cache never has to be pointed at a project directory — which would hide the user's own
cache — to find them. Only the repositories in ``planted_repos`` are ever read from the planted cache,
and only when the hub cache does not hold them: a cache the caller filled with them itself (a test's,
or ``python -m core.testbeds.planted --cache-dir`` pointed at the hub cache) is read as before.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile

from core.errors import HubError
from core.weights.hub_cache import repo_cache_dir


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
    """Where and how to fetch: a cache directory (None = huggingface_hub's default), online/offline, and
    where the planted releases' repositories are when the cache directory lacks them."""

    cache_dir: Path | None = None
    offline: bool | None = None  # None: follow HF_HUB_OFFLINE
    planted_cache_dir: Path | None = None
    planted_repos: frozenset[str] = frozenset()

    @property
    def is_offline(self) -> bool:
        return offline_from_env() if self.offline is None else self.offline

    def cache_for(self, repo_id: str) -> Path | None:
        """The cache ``repo_id`` is read from and downloaded into (None = huggingface_hub's default): the hub
        cache, except for a planted repository it does not hold, which comes from the planted cache."""
        if not self._from_planted_cache(repo_id):
            return self.cache_dir
        hub_cache = self.cache_dir or Path(constants.HF_HUB_CACHE)
        return self.cache_dir if repo_cache_dir(hub_cache, repo_id).is_dir() else self.planted_cache_dir

    def _from_planted_cache(self, repo_id: str) -> bool:
        """Whether ``repo_id`` may be read from the planted cache (a planted repository, and one is set)."""
        return repo_id in self.planted_repos and self.planted_cache_dir is not None

    def _not_cached(self, repo_id: str) -> str:
        """Where a missing repository was looked for, and how to get it there."""
        planted = self._from_planted_cache(repo_id)
        also = f" nor in the planted releases' cache {self.planted_cache_dir}" if planted else ""
        into = f" --cache-dir {self.planted_cache_dir}" if planted else ""
        return (
            f"is not in {self.cache_dir or 'the default hub cache'}{also} and the hub is not reachable or "
            "offline mode is on (HF_HUB_OFFLINE=1). Download it once online, or for the planted releases run "
            f"`python -m core.testbeds.planted{into}`"
        )

    def fetch(
        self, repo_id: str, patterns: list[str], revision: str | None = None, optional: Sequence[str] = ()
    ) -> Snapshot:
        """Download (or, offline, find in the cache) the files of ``repo_id`` matching ``patterns``, and those of
        ``optional`` that the repository holds (a missing one is no error).

        Raises HubError with an actionable message for a missing cache entry offline, a gated or
        unknown repository and an unknown revision.
        """
        try:
            root = snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=[*patterns, *optional],
                cache_dir=self.cache_for(repo_id),
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
            raise HubError(f"{repo_id} (revision {revision or 'main'}) {self._not_cached(repo_id)}.") from exc
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
