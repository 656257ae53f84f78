"""Shared fixtures: the planted releases generated once per session into a temporary hub cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MPLCONFIGDIR", str(Path(__file__).resolve().parents[1] / "data" / "mplconfig"))

from core.planted import generate  # noqa: E402

PLANTED = ("planted-gemma", "planted-llama")


@pytest.fixture(scope="session")
def planted_cache(tmp_path_factory) -> Path:
    """A hub cache holding both planted releases, in the exact hub layout (read offline)."""
    cache = tmp_path_factory.mktemp("hf-cache")
    for release in PLANTED:
        generate(release, cache)
    return cache
