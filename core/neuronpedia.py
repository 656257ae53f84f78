"""Neuronpedia / SAEDashboard "top logits", for moving between this project and those tools.

Their convention (SAEDashboard's feature tables, Neuronpedia's ``pos_str/pos_values/neg_str/neg_values``):
the raw product ``W_dec[i] · W_U`` — the decoder row with its norm, no final-norm gain, no softcap,
W_U not centred — and its top and bottom 10 tokens. This project's own output lens
(``core.output_lens``) folds the final norm and softcap instead; both are exported side by side.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import pandas as pd
import torch

from core import atomic
from core.engine import RowStats, row_stats

DASHBOARD_K = 10


def raw_top_logits(W_dec: torch.Tensor, W_U: torch.Tensor, **engine_options) -> RowStats:
    """Top/bottom ``DASHBOARD_K`` of ``W_dec @ W_U.T`` (rows: features, columns: tokens)."""
    return row_stats(W_dec, W_U, k=DASHBOARD_K, **engine_options)


def dashboard_frame(stats: RowStats, tokens: list[str]) -> pd.DataFrame:
    """One row per feature: ``feature, pos_str, pos_values, neg_str, neg_values`` (lists, most extreme
    first), with ``tokens`` the decoded token strings."""
    return pd.DataFrame(
        {
            "feature": range(stats.top_ids.shape[0]),
            "pos_str": [[tokens[i] for i in row] for row in stats.top_ids.tolist()],
            "pos_values": stats.top_values.tolist(),
            "neg_str": [[tokens[i] for i in row] for row in stats.bottom_ids.tolist()],
            "neg_values": stats.bottom_values.tolist(),
        }
    )


def write_json_export(frame: pd.DataFrame, folder: Path, sae_id: str) -> Path:
    """``folder/<sae_id, URL-quoted>.json``: a list of ``{feature, pos_str, pos_values, neg_str, neg_values}``
    records, written atomically (temp file + rename)."""
    path = folder / f"{quote(sae_id, safe='')}.json"
    records = frame[["feature", "pos_str", "pos_values", "neg_str", "neg_values"]].to_dict(orient="records")
    return atomic.write_text(path, json.dumps(records))
