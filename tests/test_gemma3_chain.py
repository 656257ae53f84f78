"""The unchanged asset chain (``orchestration``'s SAE assets) materialises a planted-gemma3 partition — a Gemma 3
model with Gemma Scope 2 SAEs — and its feature classes equal the planted truth: adding the release family needed
registry data, a loader and geometry only, no change to assets or orchestration."""

from __future__ import annotations

import dagster as dg
import pytest

from core.store.storage import TableStore
from core.testbeds.planted import generate
from orchestration.definitions import SAE_ASSETS
from orchestration.partitions import sae_partitions
from tests.planted_chain import chain_resources

pytestmark = pytest.mark.chain

KEY, SAE_ID = "planted-gemma3:layer_3_width_256_l0_medium", "layer_3_width_256_l0_medium"


def test_unchanged_asset_chain_materialises_a_planted_gemma3_partition(tmp_path):
    cache, data = tmp_path / "hub", tmp_path / "data"
    truth = generate("planted-gemma3", cache, layers=[3])
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(sae_partitions.name, [KEY])
    result = dg.materialize(SAE_ASSETS, partition_key=KEY, instance=instance, resources=chain_resources(cache, data))
    assert result.success
    classes = TableStore(data).read("feature_classes", KEY)
    planted = {f["index"] for f in truth.data["saes"][SAE_ID]["semantic_features"]}
    assert len(classes) == truth.data["params"]["d_sae"]
    assert set(classes.loc[classes["output_predicting"], "feature"]) == planted  # precision and recall 1
