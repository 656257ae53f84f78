"""What a pipeline stage (``core.pipeline``) hands its asset: tables to store, facts, checks — as plain data.

The asset adapter (``assets.common.materialize``) stores each table under the output's partition key, turns
each fact into Dagster metadata by its Python type and each check group into one asset check; core never
imports Dagster.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from core.store.table_checks import Check


class Markdown(str):
    """A fact shown as rendered markdown (a table, a preview, a plot)."""


# metadata kinds by Python type: bool, int, float, str (text), Markdown, Path, dict / list (JSON)
Fact = bool | int | float | str | Markdown | Path | dict | list


@dataclass
class StageOutput:
    """One stage's results for one partition key (an SAE's ``release:sae_id``, or a release id).

    ``tables``: name -> rows to store; ``streamed``: name -> row count of tables the stage stored itself while
    it ran (``TableStore.appender``); ``facts``: metadata label -> value; ``checks``: asset check name -> its
    parts (all must pass); ``label_prefix``: put before every metadata label (release-level outputs, so no
    release's entries overwrite another's); ``data_version``: the content hash of what was read, if the asset
    reports one."""

    key: str
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    streamed: dict[str, int] = field(default_factory=dict)
    facts: dict[str, Fact] = field(default_factory=dict)
    checks: dict[str, list[Check]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    label_prefix: str = ""
    data_version: str | None = None

    def add_checks(self, checks: list[Check]) -> None:
        """Add each check as a part of the asset check of its own name."""
        for check in checks:
            self.checks.setdefault(check.name, []).append(check)
