"""Engine statistics (``core.compute.engine.RowStats``) as long-format DataFrames for the result tables."""

from __future__ import annotations

import pandas as pd
import torch

from core.compute.engine import RowStats
from core.lens.circuits import Circuit
from core.registry import SaeRef
from core.weights.model_weights import ModelGeometry

SUMMARY_COLUMNS = ("mean", "std", "median", "p75", "softmax_max", "softmax_entropy", "topk_mass")


def summary_frame(stats: RowStats, k: int | None = None) -> pd.DataFrame:
    """One row per engine row: ``row`` plus the summary statistics and ``top_mean`` (mean of the ``k`` largest
    values; all the engine kept when None)."""
    frame = pd.DataFrame({name: getattr(stats, name).numpy() for name in SUMMARY_COLUMNS})
    frame.insert(0, "row", range(len(frame)))
    frame["top_mean"] = stats.top_values[:, :k].mean(dim=1).numpy()
    return frame


def topk_frame(stats: RowStats, tokens: list[str], bottom_k: int | None = None) -> pd.DataFrame:
    """Top and bottom columns per row: ``row, side ('top'|'bottom'), rank (1 = most extreme), token_id, token,
    value`` — every top column the engine kept, the first ``bottom_k`` bottom ones (all when None)."""
    parts = []
    for side, ids, values in (
        ("top", stats.top_ids, stats.top_values),
        ("bottom", stats.bottom_ids[:, :bottom_k], stats.bottom_values[:, :bottom_k]),
    ):
        n, k = ids.shape
        flat_ids = ids.reshape(-1).tolist()
        parts.append(
            pd.DataFrame(
                {
                    "row": torch.arange(n).repeat_interleave(k).numpy(),
                    "side": side,
                    "rank": torch.arange(1, k + 1).repeat(n).numpy(),
                    "token_id": flat_ids,
                    "token": [tokens[i] for i in flat_ids],
                    "value": values.reshape(-1).numpy(),
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def circuit_frame(stats: RowStats, circuit: Circuit, geometry: ModelGeometry) -> pd.DataFrame:
    """Summary rows of one circuit: ``feature, phase, kind, attn_layer, head, kv_head``, the summary
    statistics, and the top-k column ids and values as lists."""
    frame = summary_frame(stats).rename(columns={"row": "feature"})
    frame.insert(1, "phase", circuit.phase)
    frame.insert(2, "kind", circuit.kind)
    frame.insert(3, "attn_layer", circuit.layer)
    frame.insert(4, "head", circuit.head)
    frame.insert(5, "kv_head", geometry.kv_head(circuit.head))
    frame["top_ids"] = stats.top_ids.tolist()
    frame["top_values"] = stats.top_values.tolist()
    return frame


def with_sae(frame: pd.DataFrame, ref: SaeRef) -> pd.DataFrame:
    """Prefix the SAE's identity columns ``release, sae_id, layer`` (every table carries them)."""
    out = frame.copy()
    for i, (name, value) in enumerate((("release", ref.release), ("sae_id", ref.sae_id), ("layer", ref.layer))):
        out.insert(i, name, value)
    return out
