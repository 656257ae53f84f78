"""Unit tests of the statistics (Mann–Whitney against an exact permutation test, shape detection) and of
the participation / profile functions on small synthetic frames."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch

from core.model_weights import AttentionWeights, ModelGeometry
from core.profiles import (
    compare_groups,
    depth_profile,
    feature_participation,
    ov_write_norms,
    participation,
    phase_means,
    shape_tests,
)
from core.statistics import auroc, classify_shape, depth_shape, mann_whitney, rankdata


def exact_permutation_p(x, y) -> float:
    """Two-sided exact p of U over every split of the pooled sample (the brute-force reference)."""
    pooled = np.concatenate([x, y])
    n, nx = len(pooled), len(x)
    ranks = rankdata(pooled)
    mean = nx * (n - nx) / 2
    u_obs = ranks[:nx].sum() - nx * (nx + 1) / 2
    extreme = total = 0
    for idx in itertools.combinations(range(n), nx):
        u = ranks[list(idx)].sum() - nx * (nx + 1) / 2
        total += 1
        extreme += abs(u - mean) >= abs(u_obs - mean) - 1e-9
    return extreme / total


def test_rankdata_average_ties():
    assert rankdata(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


@pytest.mark.parametrize("seed", range(6))
def test_mann_whitney_normal_approximation_matches_exact_permutation(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 6, 7).astype(float) + (seed % 3)  # ties on purpose, various shifts
    y = rng.integers(0, 6, 8).astype(float)
    test = mann_whitney(x, y)
    assert test.p_value == pytest.approx(exact_permutation_p(x, y), abs=0.03)
    # U counts pairs x > y (ties 1/2)
    pairs = sum((a > b) + 0.5 * (a == b) for a in x for b in y)
    assert test.u == pytest.approx(pairs)
    assert test.rank_biserial == pytest.approx(2 * pairs / (len(x) * len(y)) - 1)


def test_mann_whitney_extremes():
    test = mann_whitney(np.arange(10, 20), np.arange(10))
    assert test.auroc == 1.0 and test.rank_biserial == 1.0 and test.p_value < 1e-3
    same = mann_whitney(np.ones(5), np.ones(6))
    assert same.p_value == 1.0
    assert auroc(np.array([0.1, 0.9, 0.8, 0.2]), np.array([False, True, True, False])) == 1.0


def groups_for(shape: str, n_layers=8, n=200, noise=0.5, seed=0):
    z = np.linspace(0, 1, n_layers)
    u = (2 * z - 1) ** 2
    curve = {"U": u, "inverted-U": 1 - u, "flat": np.zeros_like(z), "rising": z**2}[shape]
    rng = np.random.default_rng(seed)
    return [rng.normal(c, noise, n) for c in curve], z


@pytest.mark.parametrize("shape,expected", [("U", "U"), ("inverted-U", "inverted-U"), ("flat", "flat"), ("rising", "monotone-convex")])
def test_depth_shape_detects_planted_curves(shape, expected):
    groups, z = groups_for(shape)
    fit = depth_shape(groups, z, "mean", n_boot=300)
    assert fit.shape == expected
    if expected in ("U", "inverted-U"):
        assert fit.vertex == pytest.approx(0.5, abs=0.1)
        assert math.copysign(1, fit.curvature) == (1 if expected == "U" else -1)


def test_classify_shape_rules():
    assert classify_shape((1.0, 2.0), 0.5) == "U"
    assert classify_shape((-2.0, -1.0), 0.5) == "inverted-U"
    assert classify_shape((-1.0, 2.0), 0.5) == "flat"
    assert classify_shape((1.0, 2.0), 1.5) == "monotone-convex"


def circuit_frame(shape_enc: str, shape_dec: str, n_layers=6, n_feat=60, n_null=200, seed=0):
    """Synthetic ``circuit_values`` rows: a third of the features get value = 1 + 3·profile(z) on top of
    the N(0, 0.1) noise shared with the null rows."""
    rng = np.random.default_rng(seed)
    z = np.linspace(0, 1, n_layers)
    prof = {"U": (2 * z - 1) ** 2, "inverted-U": 1 - (2 * z - 1) ** 2}
    rows = []
    for layer in range(n_layers):
        for phase, kinds, shape in (("encoder_embedding", ("qk_feature_query", "qk_feature_key"), shape_enc),
                                    ("decoder_unembedding", ("ov_write_norm",), shape_dec)):
            for kind in kinds:
                for head in range(2):
                    for sample, n in (("feature", n_feat), ("null", n_null)):
                        v = rng.normal(0, 0.1, n)
                        if sample == "feature":
                            v[: n // 3] += 1 + 3 * prof[shape][layer]
                        rows.append(pd.DataFrame({"release": "r", "sae_id": f"s{layer}", "layer": layer, "sample": sample,
                                                  "feature": np.arange(n), "phase": phase, "kind": kind, "attn_layer": layer,
                                                  "head": head, "value": v, "topk_mass": np.nan}))
    return pd.concat(rows, ignore_index=True)


def test_participation_profiles_and_shapes_on_synthetic_circuits():
    values = circuit_frame("U", "inverted-U")
    part = participation(values, quantile=0.99)
    null_rate = part[part["sample"] == "null"]["participates"].mean()
    assert null_rate == pytest.approx(0.01, abs=0.01)
    per_feature = feature_participation(part)
    assert per_feature.groupby("phase")["participates"].mean().between(0.3, 0.4).all()
    profile = depth_profile(per_feature, 6, n_boot=100)
    assert {"mean", "median", "p75", "mean_low", "mean_high", "depth"} <= set(profile.columns)
    assert (profile["mean_low"] <= profile["mean"]).all() and (profile["mean"] <= profile["mean_high"]).all()
    shapes = shape_tests(per_feature, 6, n_boot=200).set_index(["phase", "statistic"])["shape"]
    assert shapes[("encoder_embedding", "mean")] == "U"
    assert shapes[("decoder_unembedding", "mean")] == "inverted-U"


def test_phase_means_paired_bootstrap():
    rng = np.random.default_rng(0)
    n = 300
    frame = pd.concat([
        pd.DataFrame({"release": "r", "sae_id": "s", "layer": 0, "feature": range(n), "phase": "encoder_embedding",
                      "mean_score": rng.normal(1.0, 0.2, n)}),
        pd.DataFrame({"release": "r", "sae_id": "s", "layer": 0, "feature": range(n), "phase": "decoder_unembedding",
                      "mean_score": rng.normal(1.5, 0.2, n)}),
    ])
    out = phase_means(frame, n_boot=200).iloc[0]
    assert out["higher"] == "decoder_unembedding" and out["ci_low"] < 0.5 < out["ci_high"]
    flipped = frame.assign(phase=frame["phase"].map({"encoder_embedding": "decoder_unembedding", "decoder_unembedding": "encoder_embedding"}))
    assert phase_means(flipped, n_boot=200).iloc[0]["higher"] == "encoder_embedding"


def test_compare_groups():
    frame = pd.DataFrame({"semantic": [True] * 20 + [False] * 30, "x": list(range(100, 120)) + list(range(30))})
    out = compare_groups(frame, "semantic", ["x"]).iloc[0]
    assert out["rank_biserial"] == 1.0 and out["p_value"] < 1e-6 and out["n_true"] == 20


def test_ov_write_norms_matches_direct_formula():
    torch.manual_seed(0)
    geometry = ModelGeometry("llama", d_model=8, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=3, vocab_size=10,
                             rms_norm_eps=1e-5, tied_embeddings=False, rope_theta=None, attn_scale=1.0,
                             attn_softcap=None, final_softcap=None)
    attn = AttentionWeights(q=torch.randn(12, 8), k=torch.randn(6, 8), v=torch.randn(6, 8), o=torch.randn(8, 12),
                            input_gain=torch.rand(8) + 0.5, output_gain=None)
    f = torch.randn(5, 8)
    got = ov_write_norms(f, attn, geometry)
    x = f / torch.sqrt(f.pow(2).mean(1, keepdim=True) + 1e-5) * attn.input_gain
    for h in range(4):
        c = h // 2
        want = (attn.o[:, 3 * h : 3 * h + 3] @ (attn.v[3 * c : 3 * c + 3] @ x.T)).T.norm(dim=1)
        assert torch.allclose(got[:, h], want, atol=1e-5)
