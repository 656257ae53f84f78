"""Scores and verdicts are properties of the model's function: every function-preserving rewrite of a
planted model (``tests/rewrites.py``, each checked there against transformers' logits) leaves every stored
score that feeds a verdict, every class call and every verdict unchanged.

Each rewritten model is written into a copy of the hub cache as a new commit of the model repo and the
release is analysed from that cache with the chain's own stages (``tests/core_chain.analyse``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.weights.discovery import discover_saes, load_sae
from core.weights.model_weights import TOKENIZER_FILE
from core.weights.vocab import vocabulary_table
from orchestration.resources import HubResource
from tests.core_chain import analyse
from tests.planted_chain import PLANTED
from tests.rewrites import REWRITES, write_rewritten_release

pytestmark = pytest.mark.chain

SCORES = ["score_encoder_embedding", "score_decoder_unembedding", "encoder_norm", "decoder_norm", "topk_z"]
CALLS = ["output_predicting", "semantic", "semantic_output", "semantic_input"]


N_LAYERS = 5  # the first five SAEs: enough layers for every verdict (C2's permutation test needs 4 per phase)
# null directions per circuit (the lens null is four times as many): the original and the rewrite draw the same
# ones, so the size sets only how finely thresholds are estimated, not whether they move under a rewrite
N_NULL = 64


def analysed(cache: Path, release_id: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    hub = HubResource(cache_dir=str(cache), offline=True)
    saes = []
    for ref in sorted(discover_saes(release_id, hub.client()).saes, key=lambda r: r.layer)[:N_LAYERS]:
        snapshot, checkpoint, sae = load_sae(ref, hub.client())
        saes.append((ref.layer, ref.sae_id, sae))
    vocabulary = vocabulary_table(snapshot.path(TOKENIZER_FILE), checkpoint.geometry.vocab_size)
    family = checkpoint.geometry.architecture
    return analyse(release_id, family, checkpoint, vocabulary, saes, n_null=N_NULL)


@pytest.fixture(scope="module")
def original(planted_cache) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    return {release: analysed(planted_cache, release) for release in PLANTED}


CASES = [(release, name) for release in PLANTED for name in REWRITES[release]]


@pytest.mark.parametrize("release,name", CASES, ids=[f"{r}-{n}" for r, n in CASES])
def test_rewrite_leaves_scores_classes_and_verdicts_unchanged(original, planted_cache, tmp_path, release, name):
    cache = write_rewritten_release(planted_cache, tmp_path / "hub", release, REWRITES[release][name])
    per_feature, verdicts = analysed(cache, release)
    base_features, base_verdicts = original[release]
    keys = ["sample", "sae_id", "feature"]
    a, b = (f.sort_values(keys).reset_index(drop=True) for f in (base_features, per_feature))
    for column in SCORES:  # RMSNorm's eps makes a moved scale exact only up to ~1e-6 relative
        np.testing.assert_allclose(b[column].to_numpy(), a[column].to_numpy(), rtol=1e-3, atol=1e-3, err_msg=column)
    for column in CALLS:  # a call at its threshold may flip with the eps-level change (Llama bf16: 1 in 3072)
        assert (a[column] == b[column]).mean() >= 0.998, column
    pd.testing.assert_series_equal(verdicts["verdict"], base_verdicts["verdict"])
    np.testing.assert_allclose(verdicts["value"].to_numpy(), base_verdicts["value"].to_numpy(), rtol=1e-2, atol=1e-3)
