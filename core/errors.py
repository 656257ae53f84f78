"""Errors users see: each names the file or repository and what is wrong with it."""

from __future__ import annotations

from pathlib import Path


class WeightFileError(ValueError):
    """A weight, config or index file that cannot be used: corrupt, wrong shape/dtype, non-finite."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


class HubError(RuntimeError):
    """The hub or the local cache cannot provide a repository's files; the message says what to do."""
