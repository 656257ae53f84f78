"""Unit tests of the statistics (Mann–Whitney, the permutation shape test and van Elteren's stratified test
against exact enumerations) and of the participation / profile functions on small synthetic frames."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from core.analysis.profiles import (
    SCORE_KINDS,
    circuit_values,
    depth_profile,
    feature_participation,
    null_z,
    participation,
)
from core.analysis.statistics import (
    auroc,
    layer_bootstrap,
    mann_whitney,
    min_layers_for,
    rankdata,
    shape_permutation_test,
    sign_flip_test,
    stratified_rank_test,
)

pytestmark = pytest.mark.unit


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


@pytest.mark.parametrize("shape,sign", [("U", 1), ("inverted-U", -1)])
def test_shape_permutation_test_detects_its_shape_and_only_its_shape(shape, sign):
    z = np.linspace(0, 1, 6)
    curve = sign * (2 * z - 1) ** 2
    test = shape_permutation_test(curve, z, shape)
    assert test.n_permutations == math.factorial(6)
    # the planted order is the most extreme; orders swapping equal values (the curve is symmetric) tie it
    assert 1 / 720 <= test.p_value <= 8 / 720
    assert test.vertex == pytest.approx(0.5, abs=1e-9) and test.p_opposite == pytest.approx(1.0)
    opposite = {"U": "inverted-U", "inverted-U": "U"}[shape]
    assert shape_permutation_test(curve, z, opposite).p_value == pytest.approx(1.0)


def test_shape_permutation_p_is_exact_and_uniform_on_flat_profiles():
    z = np.linspace(0, 1, 5)
    values = np.array([0.3, -1.2, 0.8, 2.0, -0.4])
    test = shape_permutation_test(values, z, "U")
    design = np.stack([np.ones(5), z, z * z], 1)
    curv = [np.linalg.lstsq(design, values[list(p)], rcond=None)[0][2] for p in itertools.permutations(range(5))]
    assert test.p_value == pytest.approx(np.mean(np.array(curv) >= curv[0] - 1e-12))
    rng = np.random.default_rng(0)
    p = [shape_permutation_test(rng.normal(size=6), np.linspace(0, 1, 6), "U").p_value for _ in range(200)]
    assert np.mean(np.array(p) < 0.05) <= 0.1  # a flat (noise) profile is significant at about the nominal rate
    assert min_layers_for(0.05) == 4 and min_layers_for(0.01) == 5


def test_stratified_rank_test_is_stratified_directional_and_matches_mann_whitney_on_one_stratum():
    rng = np.random.default_rng(1)
    x, y = rng.normal(0.5, 1, 40), rng.normal(0, 1, 50)
    one = stratified_rank_test([(x, y)], n_boot=200)
    mw = mann_whitney(x, y)
    assert one.auroc == pytest.approx(mw.auroc) and one.strata == 1
    assert one.ci_low < one.auroc < one.ci_high
    assert one.p_greater == pytest.approx(
        0.5 * math.erfc(((mw.u - 40 * 50 / 2) / math.sqrt(40 * 50 / 12 * 91)) / math.sqrt(2)), rel=0.05
    )
    # Simpson: within each layer no difference, but layer 1 has more semantic features and larger values
    a = (rng.normal(0, 1, 80), rng.normal(0, 1, 20))
    b = (rng.normal(5, 1, 20), rng.normal(5, 1, 80))
    pooled = mann_whitney(np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]]))
    stratified = stratified_rank_test([a, b], n_boot=200)
    assert pooled.p_value < 1e-6 and stratified.p_greater > 0.01 and stratified.ci_low < 0.56
    smaller = stratified_rank_test([(y, x)], n_boot=0)
    assert smaller.p_greater > 0.95 and math.isnan(smaller.ci_low)  # direction: x larger is not "y larger"


def test_sign_flip_test_is_exact_and_directional():
    p_up, p_down = sign_flip_test(np.array([0.5, 0.7, 0.2, 0.9, 0.4]))
    assert p_up == pytest.approx(1 / 32) and p_down == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    rejections = [sign_flip_test(rng.normal(size=6))[0] < 0.05 for _ in range(400)]
    assert np.mean(rejections) <= 0.08


def test_layer_bootstrap_covers_the_mean():
    low, high = layer_bootstrap(np.array([0.2, 0.25, 0.3, 0.22]))
    assert low <= 0.2425 <= high and low >= 0.2 and high <= 0.3


def circuit_frame(shape_enc: str, shape_dec: str, n_layers=6, n_feat=60, n_null=200, seed=0, scale=None):
    """Synthetic ``circuit_values`` rows of the scored kinds: a third of the features get value = 1 +
    3·profile(z) on top of the N(0, 0.1) noise shared with the null rows; ``scale`` multiplies every value
    of a (layer, kind) by its own positive factor (a rewrite that features and null share)."""
    rng = np.random.default_rng(seed)
    z = np.linspace(0, 1, n_layers)
    prof = {"U": (2 * z - 1) ** 2, "inverted-U": 1 - (2 * z - 1) ** 2}
    rows = []
    for layer in range(n_layers):
        for phase, kinds in SCORE_KINDS.items():
            shape = shape_enc if phase == "encoder_embedding" else shape_dec
            for kind in kinds:
                c = 1.0 if scale is None else scale[(layer, kind)]
                for head in range(2):
                    for sample, n in (("feature", n_feat), ("null", n_null)):
                        v = rng.normal(0, 0.1, n)
                        if sample == "feature":
                            v[: n // 3] += 1 + 3 * prof[shape][layer]
                        rows.append(
                            pd.DataFrame(
                                {
                                    "release": "r",
                                    "sae_id": f"s{layer}",
                                    "layer": layer,
                                    "sample": sample,
                                    "feature": np.arange(n),
                                    "phase": phase,
                                    "kind": kind,
                                    "attn_layer": layer,
                                    "head": head,
                                    "value": c * v,
                                    "topk_mass": np.nan,
                                }
                            )
                        )
    return pd.concat(rows, ignore_index=True)


def test_participation_scores_are_null_z_and_profiles_follow_the_planted_shape():
    values = circuit_frame("U", "inverted-U")
    part = participation(values, quantile=0.99)
    null = part[part["sample"] == "null"]
    assert null["participates"].mean() == pytest.approx(0.01, abs=0.01)
    assert abs(null["score"].median()) < 0.1  # noise scores about 0, not a positive excess
    per_feature = feature_participation(part)
    assert set(per_feature["sample"]) == {"feature"}
    assert per_feature.groupby("phase")["participates"].mean().between(0.3, 0.4).all()
    profile = depth_profile(per_feature, 6, n_boot=100)
    assert {"sample", "mean", "median", "p75", "mean_low", "mean_high", "depth"} <= set(profile.columns)
    assert (profile["mean_low"] <= profile["mean"]).all() and (profile["mean"] <= profile["mean_high"]).all()
    for phase, shape in (("encoder_embedding", "U"), ("decoder_unembedding", "inverted-U")):
        means = profile[profile["phase"] == phase].sort_values("layer")["mean"].to_numpy()
        assert shape_permutation_test(means, np.linspace(0, 1, 6), shape).p_value < 0.05


def test_scores_do_not_move_when_a_circuit_is_rescaled():
    """A positive factor per (layer, kind), shared by features and null (what a function-preserving
    rewrite does to a write norm or a QK score), leaves every z and every participation call unchanged."""
    rng = np.random.default_rng(3)
    kinds = [k for ks in SCORE_KINDS.values() for k in ks]
    scale = {(layer, kind): float(2.0 ** rng.integers(-4, 5)) for layer in range(6) for kind in kinds}
    base, scaled = circuit_frame("U", "U"), circuit_frame("U", "U", scale=scale)
    np.testing.assert_allclose(null_z(scaled).to_numpy(), null_z(base).to_numpy(), rtol=1e-9, atol=1e-9)
    a, b = participation(base), participation(scaled)
    np.testing.assert_allclose(b["score"].to_numpy(), a["score"].to_numpy(), rtol=1e-9, atol=1e-9)
    assert (a["participates"] == b["participates"]).all()


def test_the_default_circuit_set_is_what_participation_reads_and_all_adds_only_unread_rows(tmp_path):
    """``circuit_set="used"`` computes exactly the circuit kinds ``SCORE_KINDS`` reads; ``"all"`` adds the
    decoder-side ``ov`` rows and leaves every class and participation score unchanged."""
    from core.stages import EngineSettings, circuit_stage
    from tests.core_chain import random_model, random_sae

    checkpoint = random_model("gemma2", 3, tmp_path)
    sae = random_sae(checkpoint.geometry.d_model, 32, 3)
    ids = {"release": "r", "sae_id": "s", "layer": 2}
    runs = {
        name: circuit_stage(sae, checkpoint, "r:s", 2, 16, EngineSettings(), "adjacent", name)
        for name in ("used", "all")
    }
    kinds = {name: set(out.circuit_stats["kind"]) for name, out in runs.items()}
    read = {kind for phase_kinds in SCORE_KINDS.values() for kind in phase_kinds} - {"ov_write_norm"}
    assert kinds == {"used": read, "all": read | {"ov"}}
    assert runs["all"].n_circuits == runs["used"].n_circuits * 4 // 3  # one more kind beside the three read

    def scores(out):
        return participation(circuit_values(out.circuit_stats.assign(**ids), out.head_writes.assign(**ids)))

    used, every = (scores(out) for out in runs.values())
    assert len(used) and used["participates"].notna().all()
    pd.testing.assert_frame_equal(used, every)
