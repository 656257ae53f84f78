"""A stand-in for the Hugging Face hub's HTTP API on 127.0.0.1, serving the repositories of a hub cache.

``huggingface_hub`` is pointed at it with ``HF_ENDPOINT`` (read at import time, so the client runs in a
process started with it set). The routes and headers are the ones huggingface_hub 2.4 reads
(``hf_api.model_info`` / ``list_repo_tree``, ``file_download.get_hf_file_metadata`` /
``_get_metadata_or_catch_error`` / ``http_get``, ``utils._http.hf_raise_for_status``):

* ``GET /api/models/{repo}`` (repo ids are ``org/name``) and ``.../revision/{rev}``: ``id``, ``sha``,
  ``siblings``, ``gated``.
* ``GET /api/models/{repo}/tree/{rev}[/{path}]`` (``recursive``, ``cursor``): files with ``oid`` (git
  blob sha1; for LFS files the sha1 of the pointer file), ``size``, ``lfs {oid, size, pointerSize}``,
  directories with their git tree oid; pages of ``page_size`` entries chained by a ``Link: rel="next"``.
* ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: plain git files answer 200 with ``ETag`` (git sha1),
  ``X-Repo-Commit`` and ``Content-Length``; LFS files answer 302 to a second server (the "CDN", another
  origin, so the client drops ``Authorization`` as it does for the real CDN) with ``X-Linked-Etag``
  (sha256), ``X-Linked-Size`` and ``X-Repo-Commit``. No Xet headers or fields, so no Xet path runs.

Errors carry ``X-Error-Code`` as on the hub: unknown repo 404 ``RepoNotFound``, unknown revision 404
``RevisionNotFound``, unknown file 404 ``EntryNotFound``. Gated repos (as on the hub) list publicly but
serve file contents only to ``Authorization: Bearer <token>``: 401 ``GatedRepo`` without credentials,
403 with other ones. The cache is read per request, so a revision written while serving is seen at once.
Every request is recorded; the servers stop on leaving the context or after ``lifetime_s``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from core.weights.hub_cache import read_tree, repo_cache_dir


@dataclass(frozen=True)
class Request:
    server: str  # "hub" or "cdn"
    method: str
    path: str  # with the query string
    headers: dict[str, str]  # names lower-cased


@dataclass(frozen=True)
class _File:
    blob: Path
    size: int
    oid: str  # git blob sha1 (of the LFS pointer for LFS files)
    sha256: str | None  # LFS files only
    pointer_size: int | None


class _Reply(Exception):
    """An HTTP error reply: status plus the hub's X-Error-Code."""

    def __init__(self, status: int, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status} {code}")
        self.status, self.code, self.headers = status, code, headers or {}


def _git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _git_tree_oids(files: dict[str, str]) -> dict[str, str]:
    """Git tree sha1 of every directory ("" = root) of a tree given as {path: git blob sha1}."""
    children: dict[str, dict[str, tuple[str, str]]] = {"": {}}  # dir -> name -> (mode, path)
    for path in files:
        parts = path.split("/")
        for depth in range(len(parts)):
            parent, name = "/".join(parts[:depth]), parts[depth]
            full = "/".join(parts[: depth + 1])
            children.setdefault(parent, {})[name] = ("100644" if depth == len(parts) - 1 else "40000", full)
    oids: dict[str, str] = {}

    def tree(directory: str) -> str:
        entries = children[directory]
        body = b""
        for name in sorted(entries, key=lambda n: n + "/" if entries[n][0] == "40000" else n):  # git's order
            mode, full = entries[name]
            oid = tree(full) if mode == "40000" else files[full]
            body += f"{mode} {name}".encode() + b"\0" + bytes.fromhex(oid)
        oids[directory] = hashlib.sha1(b"tree %d\0" % len(body) + body).hexdigest()
        return oids[directory]

    tree("")
    return oids


class FakeHub:
    """``with FakeHub(source_cache, gated={...}, token=...) as hub:`` then ``HF_ENDPOINT=hub.url``."""

    def __init__(
        self,
        source: Path,
        *,
        gated: Iterable[str] = (),
        token: str | None = None,
        page_size: int = 1000,
        lifetime_s: float = 120.0,
    ) -> None:
        self.source = Path(source)
        self.gated = frozenset(gated)
        self.token = token
        self.page_size = page_size
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._hub = ThreadingHTTPServer(("127.0.0.1", 0), self._handler("hub"))
        self._cdn = ThreadingHTTPServer(("127.0.0.1", 0), self._handler("cdn"))
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True
        self._stopped = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def __enter__(self) -> FakeHub:
        for server in (self._hub, self._cdn):
            threading.Thread(target=server.serve_forever, daemon=True).start()
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._timer.cancel()
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()

    # -- repository data, read from the source cache per request --------------------------------------

    def _commit(self, repo: str, revision: str) -> str:
        repo_dir = repo_cache_dir(self.source, repo)
        if not (repo_dir / "refs" / "main").is_file():
            raise _Reply(404, "RepoNotFound")
        ref = repo_dir / "refs" / revision
        if ref.is_file():
            return ref.read_text().strip()
        if len(revision) == 40 and (repo_dir / "snapshots" / revision).is_dir():
            return revision
        raise _Reply(404, "RevisionNotFound")

    def _files(self, repo: str, commit: str) -> dict[str, _File]:
        blobs = repo_cache_dir(self.source, repo) / "blobs"
        files = {}
        for path, blob_name in read_tree(self.source, repo, commit).items():
            blob = blobs / blob_name
            size = blob.stat().st_size
            if len(blob_name) == 64:  # the cache names LFS blobs by sha256, git files by git sha1
                pointer = _lfs_pointer(blob_name, size)
                files[path] = _File(blob, size, _git_blob_sha1(pointer), blob_name, len(pointer))
            else:
                files[path] = _File(blob, size, blob_name, None, None)
        return files

    def _info(self, repo: str, revision: str) -> dict[str, Any]:
        commit = self._commit(repo, revision)
        return {
            "_id": hashlib.sha1(repo.encode()).hexdigest()[:24],
            "id": repo,
            "modelId": repo,
            "sha": commit,
            "private": False,
            "disabled": False,
            "gated": "manual" if repo in self.gated else False,
            "siblings": [{"rfilename": p} for p in sorted(self._files(repo, commit))],
        }

    def _tree(self, repo: str, revision: str, path: str, recursive: bool) -> list[dict[str, Any]]:
        files = self._files(repo, self._commit(repo, revision))
        dirs = _git_tree_oids({p: f.oid for p, f in files.items()})
        if path not in dirs:
            raise _Reply(404, "EntryNotFound")
        prefix = f"{path}/" if path else ""
        entries: list[dict[str, Any]] = [
            {"type": "directory", "oid": oid, "size": 0, "path": d} for d, oid in dirs.items() if d
        ]
        for p, f in files.items():
            entry: dict[str, Any] = {"type": "file", "oid": f.oid, "size": f.size, "path": p}
            if f.sha256 is not None:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
            entries.append(entry)
        return sorted(
            (e for e in entries if e["path"].startswith(prefix) and (recursive or "/" not in e["path"][len(prefix) :])),
            key=lambda e: e["path"],
        )

    def _authorized(self, repo: str, headers: dict[str, str]) -> None:
        if repo not in self.gated:
            return
        auth = headers.get("authorization")
        if auth is None:
            raise _Reply(401, "GatedRepo")
        if self.token is None or auth != f"Bearer {self.token}":
            raise _Reply(403, "GatedRepo")

    # -- HTTP ---------------------------------------------------------------------------------------------

    def _handler(self, server: str) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._serve(body=True)

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
                pass

            def _serve(self, body: bool) -> None:
                headers = {k.lower(): v for k, v in self.headers.items()}
                hub.requests.append(Request(server, self.command, self.path, headers))
                try:
                    status, reply_headers, content = (
                        hub._route(self.path, headers) if server == "hub" else hub._cdn_blob(self.path)
                    )
                except _Reply as reply:
                    status, content = reply.status, json.dumps({"error": str(reply)}).encode()
                    reply_headers = {**reply.headers, "Content-Type": "application/json"}
                    if reply.code:
                        reply_headers["X-Error-Code"] = reply.code
                self.send_response(status)
                for name, value in {**reply_headers, "Content-Length": str(len(content))}.items():
                    self.send_header(name, value)
                self.end_headers()
                if body:
                    self.wfile.write(content)

        return Handler

    def _route(self, target: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        url = urlsplit(target)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo, rest = "/".join(parts[2:4]), parts[4:]
            if not rest:
                return self._json(self._info(repo, "main"))
            if rest[0] == "revision" and len(rest) == 2:
                return self._json(self._info(repo, rest[1]))
            if rest[0] == "tree" and len(rest) >= 2:
                return self._tree_page(url.path, query, repo, rest[1], "/".join(rest[2:]))
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), headers)
        raise _Reply(404)

    def _json(self, data: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        return 200, {"Content-Type": "application/json", **(headers or {})}, json.dumps(data).encode()

    def _tree_page(
        self, url_path: str, query: dict[str, str], repo: str, revision: str, path: str
    ) -> tuple[int, dict[str, str], bytes]:
        entries = self._tree(repo, revision, path, query.get("recursive", "").lower() in {"1", "true"})
        start = int(query.get("cursor", "0"))
        end = start + self.page_size
        headers = {}
        if end < len(entries):
            next_url = f"{self.url}{url_path}?{urlencode({**query, 'cursor': str(end)})}"
            headers["Link"] = f'<{next_url}>; rel="next"'
        return self._json(entries[start:end], headers)

    def _resolve(
        self, repo: str, revision: str, path: str, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        commit = self._commit(repo, revision)
        self._authorized(repo, headers)
        file = self._files(repo, commit).get(path)
        if file is None:
            raise _Reply(404, "EntryNotFound", {"X-Repo-Commit": commit})
        if file.sha256 is None:
            return (
                200,
                {"X-Repo-Commit": commit, "ETag": f'"{file.oid}"', "Content-Type": "application/octet-stream"},
                file.blob.read_bytes(),
            )
        return (
            302,
            {
                "X-Repo-Commit": commit,
                "ETag": f'"{file.oid}"',
                "X-Linked-Etag": f'"{file.sha256}"',
                "X-Linked-Size": str(file.size),
                "Location": f"{self.cdn_url}/{quote(repo)}/{file.sha256}",
            },
            b"",
        )

    def _cdn_blob(self, target: str) -> tuple[int, dict[str, str], bytes]:
        *repo, sha256 = unquote(urlsplit(target).path).strip("/").split("/")
        blob = repo_cache_dir(self.source, "/".join(repo)) / "blobs" / sha256
        if len(repo) != 2 or len(sha256) != 64 or not blob.is_file():
            raise _Reply(404)
        return 200, {"ETag": f'"{sha256}"', "Content-Type": "application/octet-stream"}, blob.read_bytes()
