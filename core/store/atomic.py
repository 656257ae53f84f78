"""One way to write a file: to a temporary name beside it, fsync, then ``os.replace`` onto the target.

Readers see the old file or the new one, never a half file; a failed write leaves the old file untouched
and removes its temporary file. Temporary names are ``.<name>.<host>.<pid>.<uuid>.tmp`` so that a sweep
(``sweep_orphans``) can tell, for files a killed writer left behind, which host wrote them and whether
that process still runs — several hosts may share a data directory, and none judges another's files.
Every file the project writes (tables, exports, plots, reports, hub-layout files) goes through here.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

TMP_SUFFIX = ".tmp"
HOST = socket.gethostname().replace(".", "-")  # dots separate the name's fields


def temporary_name(path: Path) -> Path:
    """``path``'s temporary sibling: ``.<name>.<host>.<pid>.<uuid>.tmp``."""
    return path.with_name(f".{path.name}.{HOST}.{os.getpid()}.{uuid.uuid4().hex}{TMP_SUFFIX}")


@contextlib.contextmanager
def atomic_path(path: Path | str, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path for the caller to write; on success fsync it and rename it onto ``path``
    (optionally ``chmod mode`` first); on any error remove it and re-raise. Creates ``path``'s folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        if not tmp.is_symlink():
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            if mode is not None:
                os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def write_bytes(path: Path | str, data: bytes, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path, mode) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: Path | str, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def symlink(target: str, link: Path) -> None:
    """Point ``link`` at ``target`` atomically (a new link renamed over the old one)."""
    with atomic_path(link) as tmp:
        os.symlink(target, tmp)


def sweep_orphans(folder: Path) -> None:
    """Remove temporary files left in ``folder`` by writers on this host that no longer run (killed
    mid-write). Other hosts' files are left alone: their process ids mean nothing here."""
    for tmp in folder.glob(f".*{TMP_SUFFIX}"):
        parts = tmp.name.rsplit(".", 4)  # ['.<name>', '<host>', '<pid>', '<uuid>', 'tmp']
        if len(parts) == 5 and parts[1] == HOST and parts[2].isdigit() and not process_alive(int(parts[2])):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (signal 0 probes without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
