"""Model reader: only named tensors through the shard index, and clear errors for bad checkpoints."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from core.errors import WeightFileError
from core.pipeline import vocab_matrices
from core.store import atomic
from core.weights import model_weights, sae_formats
from core.weights.model_weights import ModelCheckpoint, open_checkpoint
from core.weights.sae_formats import FINITE_CHUNK_ELEMENTS

pytestmark = pytest.mark.unit


@pytest.fixture()
def llama_dir(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
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
    with pytest.raises(
        WeightFileError, match=r"model.safetensors.index.json: tensor 'model.norm.weight' is not in the weight map"
    ):
        ModelCheckpoint(llama_dir).final_norm_gain()


def test_config_that_disagrees_with_weights(llama_dir):
    config = llama_dir / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "vocab_size": 65}))
    with pytest.raises(
        WeightFileError, match=r"model.embed_tokens.weight has shape \(64, 32\), config.json implies \(65, 32\)"
    ):
        ModelCheckpoint(llama_dir).embedding()


def test_truncated_shard_and_nan_weights(llama_dir):
    ckpt = ModelCheckpoint(llama_dir)
    shard = llama_dir / ckpt.weight_map["lm_head.weight"]
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(WeightFileError, match=f"{shard.name}: unreadable safetensors"):
        ModelCheckpoint(llama_dir).unembedding()


def test_nan_weights_are_refused(tmp_path):
    config = LlamaConfig(
        vocab_size=16,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.norm.weight[3] = float("nan")
    model.save_pretrained(tmp_path)
    with pytest.raises(WeightFileError, match="model.norm.weight has 1 NaN/Inf values"):
        ModelCheckpoint(tmp_path).final_norm_gain()


def test_missing_config_and_weights(tmp_path):
    with pytest.raises(WeightFileError, match="config.json: file not found"):
        ModelCheckpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(WeightFileError, match="missing or malformed config field"):
        ModelCheckpoint(tmp_path)


def write_checkpoint(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """A single-file checkpoint (config.json + model.safetensors) holding just ``tensors``."""
    atomic.write_text(folder / "config.json", json.dumps(config))
    atomic.write_bytes(folder / "model.safetensors", save(tensors))
    return folder


def test_finiteness_is_checked_in_chunks_and_finds_a_nan_in_the_middle(tmp_path, monkeypatch):
    """A bf16 embedding of 3.2M entries (4 chunks): every torch.isfinite pass sees at most one chunk, together
    they see every entry, and a NaN in an inner chunk plus an Inf in the last are counted, naming file and tensor."""
    vocab, d = 100_000, 32
    config = Gemma2Config(
        vocab_size=vocab,
        hidden_size=d,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
    ).to_dict()
    embedding = torch.randn(vocab, d).to(torch.bfloat16)
    embedding[50_000, 7], embedding[99_999, 0] = float("nan"), float("-inf")
    folder = write_checkpoint(tmp_path, config, {"model.embed_tokens.weight": embedding})
    seen: list[int] = []
    isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: seen.append(t.numel()) or isfinite(t))
    shard = folder / "model.safetensors"
    with pytest.raises(WeightFileError, match=rf"^{shard}: model.embed_tokens.weight has 2 NaN/Inf values$"):
        ModelCheckpoint(folder).embedding()
    assert sum(seen) == vocab * d and len(seen) >= 3 and max(seen) <= FINITE_CHUNK_ELEMENTS


def test_tied_embedding_is_one_tensor_read_once_and_freed_with_its_checkpoint(tmp_path):
    """Gemma (tied): unembedding() is the embedding tensor itself, so the classes step's arrays share one buffer;
    the checkpoint keeps it while it lives, and frees it with itself."""
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
    )
    Gemma2ForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    ckpt = ModelCheckpoint(tmp_path)
    embedding, unembedding = ckpt.embedding(), ckpt.unembedding()
    assert unembedding is embedding and unembedding.data_ptr() == embedding.data_ptr()
    assert embedding.dtype == torch.float32
    w_e, w_u = vocab_matrices(ckpt)
    assert np.shares_memory(w_e, w_u) and w_e.shape == (64, 32)
    held = weakref.ref(embedding)
    del embedding, unembedding, w_e, w_u
    gc.collect()
    assert held() is not None  # kept: the next stage of this process reads no second copy
    del ckpt
    gc.collect()
    assert held() is None


def test_a_process_reads_the_vocabulary_matrices_once_per_model_state(llama_dir, monkeypatch):
    """``open_checkpoint`` (what ``fetch_model`` returns): one checkpoint per folder and file state, so every stage
    of a process gets the embedding it read first; rewriting a file gives a new checkpoint that reads the new one."""
    reads = []
    real = model_weights.read_float32
    monkeypatch.setattr(model_weights, "read_float32", lambda path, name: reads.append(name) or real(path, name))
    first = open_checkpoint(llama_dir)
    embedding = first.embedding()
    del embedding
    gc.collect()
    assert open_checkpoint(llama_dir) is first and first.embedding() is first.embedding()
    assert open_checkpoint(llama_dir).unembedding() is first.unembedding()
    assert reads == ["model.embed_tokens.weight", "lm_head.weight"]
    config = llama_dir / "config.json"
    config.write_text(config.read_text() + "\n")  # a new file state: the folder is not the model it was
    second = open_checkpoint(llama_dir)
    assert second is not first
    second.embedding()
    assert reads[-1] == "model.embed_tokens.weight"


def test_untied_unembedding_is_its_own_tensor(llama_dir):
    ckpt = ModelCheckpoint(llama_dir)
    embedding, unembedding = ckpt.embedding(), ckpt.unembedding()
    assert unembedding is not embedding and not torch.equal(unembedding, embedding)
    assert ckpt.embedding() is embedding  # held by the caller: the same object, not a second read


def test_a_bf16_tensor_is_read_to_float32_in_row_blocks(tmp_path, monkeypatch):
    """``read_float32``: a bf16 tensor converted block by block (several blocks here, a ragged last one) equals its
    float32 cast; a float32 tensor comes back as stored; a missing name is an error naming the file."""
    monkeypatch.setattr(sae_formats, "FLOAT32_BLOCK_BYTES", 4 * 16 * 7)  # 7 rows of 16 per block
    gen = torch.Generator().manual_seed(0)
    stored = {"w": torch.randn(50, 16, generator=gen).to(torch.bfloat16), "f": torch.randn(3, 4, generator=gen)}
    path = tmp_path / "t.safetensors"
    path.write_bytes(save(stored))
    assert torch.equal(sae_formats.read_float32(path, "w"), stored["w"].float())
    assert torch.equal(sae_formats.read_float32(path, "f"), stored["f"])
    with pytest.raises(WeightFileError, match="t.safetensors.*missing tensors"):
        sae_formats.read_float32(path, "absent")
