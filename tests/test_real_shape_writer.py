"""``benchmarks/real_shape.py`` writes what the chain reads: each named real model (``MODELS``), shrunk to a few
dimensions but with its family, dtype, tying, release and SAE format, is written into a hub cache and loaded
offline by the chain's own loader — so the benchmark, which CI never runs at full size, cannot rot unseen."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from safetensors import safe_open

from benchmarks.real_shape import MODELS, circuit_curve, read_bytes, write_model, write_sae
from core.registry import parse_key
from core.weights.discovery import load_sae
from core.weights.hub_cache import write_snapshot
from orchestration.resources import HubResource

pytestmark = pytest.mark.unit

SMALL = {"vocab_size": 2000, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}
SMALL |= {"num_key_value_heads": 2, "head_dim": 16}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_real_model_is_written_in_the_hub_layout_the_chain_loads(name: str, tmp_path: Path) -> None:
    real = MODELS[name]
    widths = {"gemma-2-2b": real.d_sae, "llama-3.1-8b": 8 * SMALL["hidden_size"]}  # 16k; 8x the width
    model = dataclasses.replace(real, config=real.config | SMALL, d_sae=widths[name])
    staging = tmp_path / "staging"
    staging.mkdir()
    model_files = write_model(model, staging)
    write_snapshot(tmp_path / "hub", model.model_repo, model_files, base=None)
    write_snapshot(tmp_path / "hub", model.sae_repo, write_sae(model, staging), base=None)

    hub = HubResource(cache_dir=str(tmp_path / "hub"), offline=True).client()
    snapshot, checkpoint, sae = load_sae(parse_key(f"{model.release}:{model.sae_id}"), hub)
    assert checkpoint.geometry.n_layers == real.config["num_hidden_layers"]
    assert checkpoint.geometry.tied_embeddings == real.config["tie_word_embeddings"]
    assert tuple(checkpoint.unembedding().shape) == (SMALL["vocab_size"], SMALL["hidden_size"])
    assert tuple(sae.W_dec.shape) == (model.d_sae, SMALL["hidden_size"])
    # the shards written hold the tensors the chain reads, in the real repo's dtype; the MLP shards are only listed
    written = [name for name in model_files if name.endswith(".safetensors")]
    with safe_open(snapshot.path(written[0]), framework="pt") as f:
        assert str(f.get_tensor(next(iter(f.keys()))).dtype) == f"torch.{real.config['torch_dtype']}"
    assert set(checkpoint.needed_shards()) <= set(written) < set(checkpoint.weight_map.values())
    vocabulary = checkpoint.unembedding().numel() * (1 if checkpoint.geometry.tied_embeddings else 2)
    assert read_bytes(model) >= 4 * (vocabulary + sae.W_enc.numel() + sae.W_dec.numel())  # what a step holds


def test_circuit_curve_reads_one_point_per_circuit_and_its_slope() -> None:
    gib, mib = 1 << 30, 1 << 20
    # three engine calls per circuit (feature, control, null); the last of each is the circuit's point
    flat = [g for _ in range(10) for g in (3 * gib, 4 * gib, 3 * gib)]
    assert "+0.0 MiB per circuit" in circuit_curve(flat)
    growing = [g for c in range(10) for g in (0, 0, 3 * gib + 20 * mib * c)]
    assert "+20.0 MiB per circuit" in circuit_curve(growing)
    assert "3.00 / 3.08 / 3.18 GiB" in circuit_curve(growing)
