"""Model reader: only named tensors through the shard index, and clear errors for bad checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from core.errors import WeightFileError
from core.model_weights import ModelCheckpoint

pytestmark = pytest.mark.unit


@pytest.fixture()
def llama_dir(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(tmp_path, max_shard_size="20KB")
    return tmp_path


def test_needed_tensors_cover_the_analysis_and_exist(llama_dir):
    ckpt = ModelCheckpoint(llama_dir)
    needed = ModelCheckpoint.needed_tensors(ckpt.geometry)
    assert "lm_head.weight" in needed and "model.layers.1.self_attn.o_proj.weight" in needed
    assert not [n for n in needed if "mlp" in n]  # MLP weights are never read
    assert set(needed) <= set(ckpt.weight_map)
    attention = ckpt.attention(1)
    assert attention.q.shape == (32, 32) and attention.k.shape == (16, 32) and attention.output_gain is None


def test_missing_tensor_in_index_is_named(llama_dir):
    index = llama_dir / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"]["model.norm.weight"]
    index.write_text(json.dumps(data))
    with pytest.raises(WeightFileError, match=r"model.safetensors.index.json: tensor 'model.norm.weight' is not in the weight map"):
        ModelCheckpoint(llama_dir).final_norm_gain()


def test_config_that_disagrees_with_weights(llama_dir):
    config = llama_dir / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "vocab_size": 65}))
    with pytest.raises(WeightFileError, match=r"model.embed_tokens.weight has shape \(64, 32\), config.json implies \(65, 32\)"):
        ModelCheckpoint(llama_dir).embedding()


def test_truncated_shard_and_nan_weights(llama_dir):
    ckpt = ModelCheckpoint(llama_dir)
    shard = llama_dir / ckpt.weight_map["lm_head.weight"]
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(WeightFileError, match=f"{shard.name}: unreadable safetensors"):
        ModelCheckpoint(llama_dir).unembedding()


def test_nan_weights_are_refused(tmp_path):
    config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.norm.weight[3] = float("nan")
    model.save_pretrained(tmp_path)
    with pytest.raises(WeightFileError, match="model.norm.weight has NaN/Inf values"):
        ModelCheckpoint(tmp_path).final_norm_gain()


def test_missing_config_and_weights(tmp_path):
    with pytest.raises(WeightFileError, match="config.json: file not found"):
        ModelCheckpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(WeightFileError, match="missing or malformed config field"):
        ModelCheckpoint(tmp_path)
