"""Attention participation of features per layer and head, depth profiles, and group comparisons.

Participation score (per feature × query head × phase, from table ``circuit_stats``):

* statistic: ``top_mean`` — the mean of the k largest PRE-softmax scores of the circuit (QK attention
  scores, or OV logits). Pre-softmax because a post-softmax distribution over the whole vocabulary has
  mean 1/|V| whatever the feature does (the trap in the reference); the post-softmax ``topk_mass`` is
  carried along for the record. Units: attention-score units for QK, logit units for OV, so the two
  phases are compared in their own units only.
* circuits per phase: ``encoder_embedding`` → the QK circuits (``qk_feature_query``, ``qk_feature_key``:
  which token embeddings the feature's encoder direction attends to / is attended by), statistic
  ``top_mean`` from ``circuit_stats``; ``decoder_unembedding`` → the OV write norm
  ``‖W_O^h W_V^c n_l(d_i)‖`` (``ov_write_norms``: how much head h moves the feature's decoder direction,
  before Gemma-2's post-attention norm). Why not the ``ov`` rows of ``circuit_stats``: those logits go
  through the final RMSNorm, which divides out the head's gain, so a head that moves a feature 8×
  more strongly gives the same logits — the OV strength is invisible there. QK in the decoder phase is
  not used either: with tied embeddings it re-measures the encoder-side QK structure.
* ``excess`` = ``value`` − the median ``value`` of the null rows (random unit directions) of the same
  circuit; the phase score is the max of the excesses over the phase's kinds.
* ``participates`` = score > the ``quantile`` (default P99) of the same score over the null rows of the
  same (phase, attention layer, head): calibrated against the circuit null, not a P75 across heads,
  so about 1 % of random directions participate by construction.

Depth profile (per release and phase): per layer, the mean / median / P75 over features of the
feature's mean score over heads, at normalised depth z = layer / (n_layers − 1), with bootstrap bands
(features resampled within each layer); shape from ``core.statistics.depth_shape``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from core.model_weights import AttentionWeights, ModelGeometry
from core.statistics import depth_shape, mann_whitney, summary_statistic

PHASE_KINDS: dict[str, tuple[str, ...]] = {
    "encoder_embedding": ("qk_feature_query", "qk_feature_key"),
    "decoder_unembedding": ("ov_write_norm",),
}
OV_WRITE_KIND = "ov_write_norm"
PHASES = tuple(PHASE_KINDS)
DEFAULT_QUANTILE = 0.99
PROFILE_STATS = ("mean", "median", "p75")
SAE_COLUMNS = ["release", "sae_id", "layer"]


def circuit_values(circuit_stats: pd.DataFrame, ov_writes: pd.DataFrame | None = None) -> pd.DataFrame:
    """One long frame of participation values: the ``circuit_stats`` rows with ``value = top_mean``, plus
    the ``ov_write_norms`` rows (``value`` = write norm, ``topk_mass`` NaN)."""
    frames = [circuit_stats.assign(value=circuit_stats["top_mean"])]
    if ov_writes is not None and len(ov_writes):
        frames.append(ov_writes)  # no topk_mass column: NaN after the concat
    columns = SAE_COLUMNS + ["sample", "feature", "phase", "kind", "attn_layer", "head", "value", "topk_mass"]
    return pd.concat([f[[c for c in columns if c in f]] for f in frames], ignore_index=True)[columns]


def ov_write_norms(directions: torch.Tensor, attn: AttentionWeights, geometry: ModelGeometry) -> torch.Tensor:
    """(n, n_heads) norms ``‖W_O^h W_V^c n_l(f_i)‖`` with ``n_l(f) = f / sqrt(mean(f²) + eps) ⊙ g_in``
    (the layer's input RMSNorm) and c = kv head of h: the size of head h's write when it attends only
    to a position holding the direction f_i. Pre post-attention-norm on Gemma-2."""
    f = directions.to(torch.float32)
    x = f * torch.rsqrt(f.pow(2).mean(1, keepdim=True) + geometry.rms_norm_eps) * attn.input_gain
    hd = geometry.head_dim
    out = torch.empty(len(f), geometry.n_heads)
    for h in range(geometry.n_heads):
        c = geometry.kv_head(h)
        v = attn.v[c * hd : (c + 1) * hd]  # (hd, d)
        o = attn.o[:, h * hd : (h + 1) * hd]  # (d, hd)
        out[:, h] = ((x @ v.T) @ o.T).norm(dim=1)
    return out


def ov_write_frame(features: torch.Tensor, null: torch.Tensor, attn: AttentionWeights, geometry: ModelGeometry,
                   attn_layer: int) -> pd.DataFrame:
    """``ov_write_norms`` of the decoder directions (sample 'feature') and the null directions (sample
    'null') as rows ``sample, feature, phase, kind, attn_layer, head, value``."""
    frames = []
    for sample, vectors in (("feature", features), ("null", null)):
        norms = ov_write_norms(vectors, attn, geometry).numpy()
        n, heads = norms.shape
        frames.append(pd.DataFrame({"sample": sample, "feature": np.repeat(np.arange(n), heads),
                                    "phase": "decoder_unembedding", "kind": OV_WRITE_KIND, "attn_layer": attn_layer,
                                    "head": np.tile(np.arange(heads), n), "value": norms.reshape(-1)}))
    return pd.concat(frames, ignore_index=True)


def participation(values: pd.DataFrame, quantile: float = DEFAULT_QUANTILE) -> pd.DataFrame:
    """Per (SAE, sample, feature, phase, attn_layer, head) from ``circuit_values``: ``score`` (max over
    the phase's kinds of the null-median excess of ``value``), ``topk_mass`` (max over the same kinds),
    ``threshold`` (null ``quantile`` of the score for that circuit) and ``participates``."""
    circuit_stats = values
    circuit = ["phase", "kind", "attn_layer", "head"]
    frames = []
    for phase, kinds in PHASE_KINDS.items():
        part = circuit_stats[(circuit_stats["phase"] == phase) & circuit_stats["kind"].isin(kinds)]
        if part.empty:
            continue
        null_median = (
            part[part["sample"] == "null"].groupby(SAE_COLUMNS + circuit)["value"].median().rename("null_median")
        )
        part = part.join(null_median, on=SAE_COLUMNS + circuit)
        part = part.assign(excess=part["value"] - part["null_median"])
        frames.append(
            part.groupby(SAE_COLUMNS + ["sample", "feature", "phase", "attn_layer", "head"], as_index=False).agg(
                score=("excess", "max"), topk_mass=("topk_mass", "max")
            )
        )
    if not frames:
        return pd.DataFrame(columns=SAE_COLUMNS + ["sample", "feature", "phase", "attn_layer", "head", "score", "topk_mass", "threshold", "participates"])
    scores = pd.concat(frames, ignore_index=True)
    key = SAE_COLUMNS + ["phase", "attn_layer", "head"]
    threshold = scores[scores["sample"] == "null"].groupby(key)["score"].quantile(quantile).rename("threshold")
    scores = scores.join(threshold, on=key)
    scores["participates"] = scores["score"] > scores["threshold"]
    return scores


def feature_participation(part: pd.DataFrame) -> pd.DataFrame:
    """Per (SAE, feature, phase) over heads (and attention layers): ``mean_score``, ``max_score``,
    ``mean_topk_mass``, ``heads_participating`` and ``participates`` (in at least one head); features only."""
    feats = part[part["sample"] == "feature"]
    out = feats.groupby(SAE_COLUMNS + ["feature", "phase"], as_index=False).agg(
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
    """Per (release, phase, layer): ``depth``, ``n`` features, and for each of mean / median / P75 over
    features of ``value``: the point value and a 95 % bootstrap band (``<stat>_low``, ``<stat>_high``);
    ``participating`` = fraction of features participating in at least one head."""
    rng = np.random.default_rng(seed)
    rows = []
    for (release, phase, layer), group in feature_part.groupby(["release", "phase", "layer"]):
        values = group[value].to_numpy(dtype=np.float64)
        boot = values[rng.integers(0, len(values), (n_boot, len(values)))]
        row = {"release": release, "phase": phase, "layer": int(layer), "depth": float(normalised_depth([layer], n_layers)[0]),
               "n": len(values), "participating": float(group["participates"].mean())}
        for name in PROFILE_STATS:
            b = summary_statistic(boot, name)
            row[name] = float(summary_statistic(values, name))
            row[f"{name}_low"], row[f"{name}_high"] = (float(v) for v in np.quantile(b, [0.025, 0.975]))
        rows.append(row)
    return pd.DataFrame(rows)


def shape_tests(feature_part: pd.DataFrame, n_layers: int, value: str = "mean_score", n_boot: int = 1000) -> pd.DataFrame:
    """Per (release, phase, statistic in mean/median/P75): the quadratic fit over normalised depth, its
    curvature's 95 % bootstrap CI (features resampled within layers), the vertex and the ``shape``."""
    rows = []
    for (release, phase), group in feature_part.groupby(["release", "phase"]):
        layers = sorted(group["layer"].unique())
        values = [group.loc[group["layer"] == layer, value].to_numpy() for layer in layers]
        depth = normalised_depth(layers, n_layers)
        for stat in PROFILE_STATS:
            fit = depth_shape(values, depth, stat, n_boot=n_boot)
            rows.append({"release": release, "phase": phase, "statistic": stat, "layers": len(layers),
                         "curvature": fit.curvature, "ci_low": fit.ci_low, "ci_high": fit.ci_high,
                         "vertex": fit.vertex, "shape": fit.shape})
    return pd.DataFrame(rows)


def compare_groups(frame: pd.DataFrame, label: str, values: list[str], by: list[str] | None = None) -> pd.DataFrame:
    """Mann–Whitney U (normal approximation, tie-corrected) of each ``values`` column, ``label`` True vs
    False, per ``by`` group: n, means and medians per group, U, z, p, AUROC and rank-biserial (+ = the
    True group is larger)."""
    rows = []
    groups = frame.groupby(by) if by else [((), frame)]
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        for column in values:
            sub = group.dropna(subset=[column])
            x = sub.loc[sub[label].astype(bool), column].to_numpy()
            y = sub.loc[~sub[label].astype(bool), column].to_numpy()
            test = mann_whitney(x, y)
            rows.append({**dict(zip(by or [], key)), "variable": column, "n_true": len(x), "n_false": len(y),
                         "mean_true": float(np.mean(x)) if len(x) else np.nan, "mean_false": float(np.mean(y)) if len(y) else np.nan,
                         "median_true": float(np.median(x)) if len(x) else np.nan, "median_false": float(np.median(y)) if len(y) else np.nan,
                         "u": test.u, "z": test.z, "p_value": test.p_value, "auroc": test.auroc, "rank_biserial": test.rank_biserial})
    return pd.DataFrame(rows)


def phase_means(feature_part: pd.DataFrame, value: str = "mean_score", n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per release: the mean over features (all layers) of ``value`` in each phase, their difference
    (decoder − encoder) and its 95 % bootstrap CI (features resampled, both phases kept paired).
    The two phases' scores are in different units (QK scores vs OV logits): see the module doc."""
    rows = []
    rng = np.random.default_rng(seed)
    for release, group in feature_part.groupby("release"):
        wide = group.pivot_table(index=["sae_id", "feature"], columns="phase", values=value)
        if not set(PHASES) <= set(wide.columns):
            continue
        wide = wide.dropna()
        enc, dec = wide["encoder_embedding"].to_numpy(), wide["decoder_unembedding"].to_numpy()
        idx = rng.integers(0, len(wide), (n_boot, len(wide)))
        diff = dec[idx].mean(1) - enc[idx].mean(1)
        low, high = np.quantile(diff, [0.025, 0.975])
        rows.append({"release": release, "encoder_embedding": float(enc.mean()), "decoder_unembedding": float(dec.mean()),
                     "difference": float(dec.mean() - enc.mean()), "ci_low": float(low), "ci_high": float(high),
                     "higher": "decoder_unembedding" if low > 0 else ("encoder_embedding" if high < 0 else "neither")})
    return pd.DataFrame(rows)
