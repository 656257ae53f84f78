"""Every verdict can fail: inputs on which a claim must come out negative.

* Pure random models with pure random SAEs (both families, 8 seeds, through the same core stages as the
  chain): the rate of ``consistent`` verdicts per claim is measured and must be ≤ 1 in 8.
* Synthetic per-direction tables with a planted fraction outside the C1 band, a flat depth profile, a
  profile that only the control shows (structure of the model, not of the features), a Simpson layout for C3,
  and degenerate inputs (one layer, an empty group, no attention) → the verdict the rule promises.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from core.analysis.verdicts import VERDICTS, claim_verdicts
from core.lens.control import control_sae
from core.weights.sae_formats import SaeWeights
from tests.core_chain import random_release_verdicts

pytestmark = pytest.mark.chain

SEEDS = [("gemma2", s) for s in range(4)] + [("llama", s) for s in range(4, 8)]


@pytest.fixture(scope="module")
def random_verdicts(tmp_path_factory) -> pd.DataFrame:
    return pd.concat(
        [random_release_verdicts(family, seed, tmp_path_factory.mktemp(f"{family}{seed}")) for family, seed in SEEDS],
        ignore_index=True,
    )


def test_random_models_with_random_saes_are_not_called_consistent(random_verdicts):
    rate = (
        random_verdicts.assign(consistent=random_verdicts["verdict"] == "consistent")
        .groupby("claim")["consistent"]
        .mean()
    )
    print(
        "\nverdicts per claim over",
        len(SEEDS),
        "random releases:\n",
        pd.crosstab(random_verdicts["claim"], random_verdicts["verdict"]).to_string(),
    )
    assert (rate <= 1 / 8).all(), rate.to_dict()
    assert random_verdicts["verdict"].isin(VERDICTS).all()
    c1 = random_verdicts[random_verdicts["claim"] == "C1"]
    assert (c1["verdict"] == "not reproduced").all()  # random directions predict no tokens: the fraction is ~0


def per_direction(
    fractions: dict[int, float] | None = None,
    profile=None,
    control_profile=None,
    n=200,
    layers=6,
    semantic_shift: dict[int, float] | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """A synthetic ``per_feature`` table: per layer ``n`` features and ``n`` control directions; a feature is
    output-predicting with probability ``fractions[layer]`` (0.25); phase scores N(profile[layer], 1) for the
    features and N(control_profile[layer], 1) for the control; semantic = every 4th feature; encoder norms
    shifted by ``semantic_shift[layer]`` for semantic features."""
    rng = np.random.default_rng(seed)
    rows = []
    for layer in range(layers):
        for sample, prof in (("feature", profile), ("control", control_profile)):
            p = (fractions or {}).get(layer, 0.25) if sample == "feature" else 0.01
            semantic = np.arange(n) % 4 == 0
            shift = (semantic_shift or {}).get(layer, 0.0) if sample == "feature" else 0.0
            mean = 0.0 if prof is None else prof[layer]
            rows.append(
                pd.DataFrame(
                    {
                        "sample": sample,
                        "layer": layer,
                        "sae_id": f"s{layer}",
                        "feature": np.arange(n),
                        "output_predicting": rng.random(n) < p,
                        "semantic": semantic,
                        "encoder_norm": rng.normal(1, 0.1, n) + shift * semantic + layer,
                        "decoder_norm": np.ones(n),
                        "score_encoder_embedding": rng.normal(mean, 1, n),
                        "score_decoder_unembedding": rng.normal(mean, 1, n),
                    }
                )
            )
    return pd.concat(rows, ignore_index=True)


def verdict(table: pd.DataFrame, claim: str, family: str = "gemma2") -> pd.Series:
    out = claim_verdicts("r", family, int(table["layer"].max()) + 1, table).set_index("claim")
    return out.loc[claim]


@pytest.mark.parametrize(
    "fraction,expected",
    [(0.25, "consistent"), (0.05, "not reproduced"), (0.60, "not reproduced"), (0.30, "inconclusive")],
)
def test_c1_is_an_equivalence_test(fraction, expected):
    assert verdict(per_direction({layer: fraction for layer in range(6)}, n=2000), "C1")["verdict"] == expected


def test_c1_with_two_hits_in_twenty_is_not_consistent():
    table = per_direction(n=20, layers=1)
    table.loc[table["sample"] == "feature", "output_predicting"] = [True, True] + [False] * 18
    assert verdict(table, "C1")["verdict"] != "consistent"


def test_c2_needs_the_features_not_the_model():
    z = np.linspace(0, 1, 6)
    u = 3 * (2 * z - 1) ** 2
    planted = per_direction(profile=u, control_profile=np.zeros(6), n=400)
    assert verdict(planted, "C2 encoder_embedding")["verdict"] == "consistent"  # gemma2 pre-registers U here
    assert verdict(planted, "C2 decoder_unembedding")["verdict"] == "not reproduced"  # ... and inverted-U here
    model_only = per_direction(profile=u, control_profile=u, n=400)  # any direction shows it: not the features'
    assert verdict(model_only, "C2 encoder_embedding")["verdict"] != "consistent"
    flat = per_direction(profile=np.ones(6), control_profile=np.zeros(6), n=400)
    assert verdict(flat, "C2 encoder_embedding")["verdict"] != "consistent"


def test_c3_is_stratified_directional_and_sized():
    for seed in range(8):  # labels unrelated to the values: never an effect
        noise = per_direction(seed=seed)
        assert all(
            verdict(noise, claim)["verdict"] != "consistent"
            for claim in (
                "C3 magnitude encoder_norm",
                "C3 attention encoder_embedding",
                "C3 attention decoder_unembedding",
            )
        )
    bigger = per_direction(semantic_shift={layer: 0.5 for layer in range(6)})
    assert verdict(bigger, "C3 magnitude encoder_norm")["verdict"] == "consistent"
    smaller = per_direction(semantic_shift={layer: -0.5 for layer in range(6)})
    assert verdict(smaller, "C3 magnitude encoder_norm")["verdict"] == "not reproduced"
    # Simpson: no difference inside any layer, semantic features concentrated in the high-norm layers
    simpson = per_direction()
    simpson["semantic"] = (simpson["layer"] >= 3) & (simpson["feature"] % 4 != 0) | (simpson["layer"] < 3) & (
        simpson["feature"] % 8 == 0
    )
    assert verdict(simpson, "C3 magnitude encoder_norm")["verdict"] != "consistent"
    unit = verdict(per_direction(), "C3 magnitude decoder_norm")  # unit decoder norms: nothing to compare
    assert unit["verdict"] == "not measured" and "no spread" in unit["rule"]
    tiny = per_direction(n=12)  # 3 semantic features per layer
    assert verdict(tiny, "C3 magnitude encoder_norm")["verdict"] == "not measured"


def test_c4_is_about_llama_and_about_the_difference():
    table = per_direction(profile=np.zeros(6), control_profile=np.zeros(6))
    table.loc[table["sample"] == "feature", "score_decoder_unembedding"] += 1.0
    assert verdict(table, "C4", "llama")["verdict"] == "consistent"
    assert verdict(table, "C4", "gemma2")["verdict"] == "not measured"
    table.loc[table["sample"] == "control", "score_decoder_unembedding"] += 1.0  # the control is just as high
    assert verdict(table, "C4", "llama")["verdict"] != "consistent"


def test_degenerate_inputs_are_not_measured_with_a_reason_never_a_crash():
    one_layer = per_direction(layers=1)
    out = claim_verdicts("r", "gemma2", 1, one_layer).set_index("claim")
    assert (
        out.loc["C2 encoder_embedding", "verdict"] == "not measured"
        and "needs 4" in out.loc["C2 encoder_embedding", "rule"]
    )
    assert out.loc["C4", "verdict"] == "not measured"
    no_attention = per_direction().assign(score_encoder_embedding=np.nan, score_decoder_unembedding=np.nan)
    out = claim_verdicts("r", "llama", 6, no_attention).set_index("claim")
    assert (out.loc[["C2 encoder_embedding", "C2 decoder_unembedding", "C4"], "verdict"] == "not measured").all()
    empty = per_direction().iloc[:0]
    out = claim_verdicts("r", "llama", 6, empty)
    assert (out["verdict"] == "not measured").all() and out["rule"].str.len().gt(0).all()
    unknown = claim_verdicts("r", "mystery", 6, per_direction()).set_index("claim")
    assert unknown.loc["C2 encoder_embedding", "verdict"] == "not measured"


def test_a_control_cannot_be_drawn_from_nothing():
    empty = SaeWeights(
        W_enc=torch.zeros(4, 0),
        W_dec=torch.zeros(0, 4),
        b_enc=torch.zeros(0),
        b_dec=torch.zeros(4),
        threshold=torch.zeros(0),
        source="empty",
    )
    with pytest.raises(ValueError, match="cannot draw a control"):
        control_sae(empty, "k")
