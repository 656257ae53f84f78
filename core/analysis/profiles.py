"""Attention participation of features per layer and head, and depth profiles — in null-z units.

Values (per direction × circuit × head; tables ``circuit_stats`` and ``head_writes``):

* encoder–embedding (writer layer L): ``ov_writer`` — mean of the top-k scores f · Post(W_O W_V n(σ W_E[t])),
  how strongly the head writes token embeddings along the feature's encoder direction;
* decoder–unembedding (reader layer L+1): ``qk_feature_query`` / ``qk_feature_key`` — mean of the top-k
  pre-softmax QK scores of the decoder direction as query / as key against the unembedding rows — and
  ``ov_write_norm`` — ‖W_O W_V n(d)‖ (``core.lens.circuits.ov_write_norms``). ``ov`` logits are stored but not
  scored (the final norm makes them a function of the write's direction only; the QK and write norm carry
  the head's selectivity).

Score. Each value is turned into a **robust z against the null of the same circuit**:
``z = (value − median_null) / (1.4826 · MAD_null)``, null = random unit directions pushed through the same
(phase, kind, attention layer, head). Unitless, zero-median for directions that behave like random ones
(so noise scores about 0, not a positive excess), and invariant to every positive rescaling of a circuit
that features and null share — which covers the function-preserving rewrites: a layer's ``o_proj`` scale
before Gemma's post-attention norm, a Llama residual rescale (embeddings, ``o_proj``, ``down_proj``), a
scale moved between an RMSNorm gain and the projections reading it, ``W_Q·c, W_K/c`` and ``W_V·c, W_O/c``
per head (the QK scores and writes themselves are unchanged or scale by c for features and null alike).
The per-head phase score is the MEAN of the phase's kinds' z (a max of several null-centred values would
be biased upward on noise). ``participates`` = score > the ``quantile`` (P99) of the same score over the
null rows of that (phase, attention layer, head), so ~1 % of random directions participate by construction.

Depth profile (per release, sample ``feature`` | ``control``, phase and SAE layer): mean / median / P75 / P99
over the sample's directions of their mean score over heads, at normalised depth z = layer / (n_layers − 1).
The verdicts read the P99 (``core.analysis.verdicts``): taking part in attention is a property of a few features,
and the mean over all features moves with the SAE's covariance as much as with them (the control shows it).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from core.analysis.statistics import DEFAULT_QUANTILE, summary_statistic
from core.lens.circuits import CIRCUIT_SETS

OV_WRITE_KIND = "ov_write_norm"
SCORE_KINDS: dict[str, tuple[str, ...]] = {  # the default circuit set, plus the decoder directions' write norms
    "encoder_embedding": CIRCUIT_SETS["used"]["encoder_embedding"],
    "decoder_unembedding": (*CIRCUIT_SETS["used"]["decoder_unembedding"], OV_WRITE_KIND),
}
MAD_TO_SD = 1.4826  # MAD of a normal distribution × 1.4826 = its standard deviation
PROFILE_STATS = ("mean", "median", "p75", "p99")
SAE_COLUMNS = ["release", "sae_id", "layer"]
# The circuit_stats columns circuit_values reads.
CIRCUIT_STATS_READ = [*SAE_COLUMNS, "sample", "feature", "phase", "kind", "attn_layer", "head", "top_mean", "topk_mass"]


def circuit_values(circuit_stats: pd.DataFrame, head_writes: pd.DataFrame | None = None) -> pd.DataFrame:
    """One long frame of scored values: the ``circuit_stats`` rows of ``SCORE_KINDS`` with ``value =
    top_mean``, plus the ``head_writes`` rows (``value`` = write norm, ``topk_mass`` NaN)."""
    scored = {kind for kinds in SCORE_KINDS.values() for kind in kinds}
    frames = [circuit_stats[circuit_stats["kind"].isin(scored)].assign(value=lambda f: f["top_mean"])]
    if head_writes is not None and len(head_writes):
        frames.append(head_writes)  # no topk_mass column: NaN after the concat
    columns = SAE_COLUMNS + ["sample", "feature", "phase", "kind", "attn_layer", "head", "value", "topk_mass"]
    return pd.concat([f[[c for c in columns if c in f]] for f in frames], ignore_index=True)[columns]


def head_write_frame(norms: dict[str, np.ndarray], attn_layer: int) -> pd.DataFrame:
    """Rows ``sample, feature, phase, kind, attn_layer, head, value`` of (n, heads) write norms per sample."""
    frames = []
    for sample, values in norms.items():
        n, heads = values.shape
        frames.append(
            pd.DataFrame(
                {
                    "sample": sample,
                    "feature": np.repeat(np.arange(n), heads),
                    "phase": "decoder_unembedding",
                    "kind": OV_WRITE_KIND,
                    "attn_layer": attn_layer,
                    "head": np.tile(np.arange(heads), n),
                    "value": values.reshape(-1),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def null_z(values: pd.DataFrame) -> pd.Series:
    """Robust z of ``value`` against the ``sample == 'null'`` rows of the same SAE and circuit (module doc);
    NaN where the null has no spread (MAD 0)."""
    key = SAE_COLUMNS + ["phase", "kind", "attn_layer", "head"]
    null = values[values["sample"] == "null"].groupby(key)["value"]
    median = null.median().rename("null_median")
    frame = values.join(median, on=key)
    frame["abs_dev"] = (frame["value"] - frame["null_median"]).abs()
    mad = frame[frame["sample"] == "null"].groupby(key)["abs_dev"].median().rename("null_mad")
    frame = frame.join(mad, on=key)
    scale = (MAD_TO_SD * frame["null_mad"]).where(frame["null_mad"] > 0)
    return (frame["value"] - frame["null_median"]) / scale


def participation(values: pd.DataFrame, quantile: float = DEFAULT_QUANTILE) -> pd.DataFrame:
    """Per (SAE, sample, feature, phase, attn_layer, head) from ``circuit_values``: ``score`` (mean over the
    phase's ``SCORE_KINDS`` of the null z), ``topk_mass`` (mean over the same kinds, for the record),
    ``threshold`` (null ``quantile`` of the score for that circuit) and ``participates``."""
    columns = SAE_COLUMNS + [
        "sample",
        "feature",
        "phase",
        "attn_layer",
        "head",
        "score",
        "topk_mass",
        "threshold",
        "participates",
    ]
    scored = values.assign(z=null_z(values))
    frames = []
    for phase, kinds in SCORE_KINDS.items():
        part = scored[(scored["phase"] == phase) & scored["kind"].isin(kinds)]
        if len(part):
            frames.append(
                part.groupby(SAE_COLUMNS + ["sample", "feature", "phase", "attn_layer", "head"], as_index=False).agg(
                    score=("z", "mean"), topk_mass=("topk_mass", "mean")
                )
            )
    if not frames:
        return pd.DataFrame(columns=columns)
    scores = pd.concat(frames, ignore_index=True)
    key = SAE_COLUMNS + ["phase", "attn_layer", "head"]
    threshold = scores[scores["sample"] == "null"].groupby(key)["score"].quantile(quantile).rename("threshold")
    scores = scores.join(threshold, on=key)
    scores["participates"] = scores["score"] > scores["threshold"]
    return scores[columns]


def feature_participation(part: pd.DataFrame) -> pd.DataFrame:
    """Per (SAE, sample, feature, phase) over heads (and attention layers): ``mean_score``, ``max_score``,
    ``mean_topk_mass``, ``heads_participating`` and ``participates`` (in at least one head); the feature and
    control samples (the null only calibrates)."""
    feats = part[part["sample"] != "null"]
    out = feats.groupby(SAE_COLUMNS + ["sample", "feature", "phase"], as_index=False).agg(
        mean_score=("score", "mean"),
        max_score=("score", "max"),
        mean_topk_mass=("topk_mass", "mean"),
        heads_participating=("participates", "sum"),
    )
    out["participates"] = out["heads_participating"] > 0
    return out


def normalised_depth(layer: pd.Series | np.ndarray, n_layers: int) -> np.ndarray:
    """z = layer / (n_layers − 1) (0 for a one-layer model)."""
    return np.asarray(layer, dtype=np.float64) / max(n_layers - 1, 1)


def depth_profile(
    feature_part: pd.DataFrame, n_layers: int, value: str = "mean_score", n_boot: int = 500, seed: int = 0
) -> pd.DataFrame:
    """Per (release, sample, phase, layer): ``depth``, ``n`` directions, and for each of mean / median / P75 /
    P99 of ``value``: the point value and a 95 % bootstrap band over directions (``<stat>_low``, ``<stat>_high``:
    the within-layer sampling error only; the verdicts treat the layer as the unit, ``core.analysis.verdicts``);
    ``participating`` = fraction participating in at least one head."""
    rng = np.random.default_rng(seed)
    rows = []
    for (release, sample, phase, layer), group in feature_part.groupby(["release", "sample", "phase", "layer"]):
        values = group[value].to_numpy(dtype=np.float64)
        boot = values[rng.integers(0, len(values), (n_boot, len(values)))]
        row = {
            "release": release,
            "sample": sample,
            "phase": phase,
            "layer": int(layer),
            "depth": float(normalised_depth([layer], n_layers)[0]),
            "n": len(values),
            "participating": float(group["participates"].mean()),
        }
        for name in PROFILE_STATS:
            b = summary_statistic(boot, name)
            row[name] = float(summary_statistic(values, name))
            row[f"{name}_low"], row[f"{name}_high"] = (float(v) for v in np.quantile(b, [0.025, 0.975]))
        rows.append(row)
    return pd.DataFrame(rows)
