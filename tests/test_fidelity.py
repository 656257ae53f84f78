"""The weight-only circuits equal what transformers' own Gemma2/Llama modules compute.

Tiny random models are saved by transformers (sharded safetensors, real tensor names and config.json)
and read back by ``core.weights.model_weights``. The reference is the full ``*ForCausalLM`` forward pass of a
model whose blocks write nothing to the residual stream (o_proj and down_proj zeroed), so the logits of
an input vector are exactly transformers' final norm → lm_head → final softcap of that vector.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from core.lens.output_lens import output_lens
from core.weights.model_weights import ModelCheckpoint, ModelGeometry
from tests.device import TINY

pytestmark = pytest.mark.unit


def build(arch: str, tmp_path) -> tuple[torch.nn.Module, ModelCheckpoint]:
    torch.manual_seed(0)
    if arch == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**TINY, query_pre_attn_scalar=24))
    else:
        model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (0.0 if arch == "gemma2" else 1.0))
        for layer in model.model.layers:  # blocks add nothing: the residual stream passes unchanged
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    model.eval()
    model.save_pretrained(tmp_path, max_shard_size="60KB")
    return model, ModelCheckpoint(tmp_path)


def reference_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' logits when ``x`` is the residual stream at every block (one position each).
    (transformers 5 applies Gemma's sqrt(d_model) in the embedding module, so inputs_embeds enter as is.)"""
    with torch.no_grad():
        return model(inputs_embeds=x[:, None, :]).logits[:, 0].float()


@pytest.mark.parametrize("arch", ["gemma2", "llama"])
def test_checkpoint_is_sharded_and_geometry_matches_config(arch, tmp_path):
    model, ckpt = build(arch, tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(set(ckpt.weight_map.values())) >= 2
    g = ckpt.geometry
    cfg = model.config
    assert (g.d_model, g.n_layers, g.n_heads, g.n_kv_heads, g.head_dim, g.vocab_size) == (64, 3, 4, 2, 16, 300)
    assert g.tied_embeddings == (arch == "gemma2")
    if arch == "gemma2":
        assert g.attn_scale == pytest.approx(24**-0.5)
        assert (
            (g.attn_softcap, g.final_softcap)
            == (cfg.attn_logit_softcapping, cfg.final_logit_softcapping)
            == (50.0, 30.0)
        )
    else:
        assert g.attn_scale == pytest.approx(16**-0.5)
        assert (g.attn_softcap, g.final_softcap) == (None, None)
    assert [g.kv_head(h) for h in range(4)] == [0, 0, 1, 1]
    torch.testing.assert_close(ckpt.unembedding(), model.lm_head.weight.detach())
    torch.testing.assert_close(ckpt.attention(1).q, model.model.layers[1].self_attn.q_proj.weight.detach())


@pytest.mark.parametrize("arch", ["gemma2", "llama"])
def test_output_lens_equals_transformers_logits(arch, tmp_path):
    model, ckpt = build(arch, tmp_path)
    directions = torch.randn(37, 64, generator=torch.Generator().manual_seed(1))
    directions /= directions.norm(dim=1, keepdim=True)
    directions[0] *= 25.0  # the final norm makes the lens scale-free (up to eps)
    expected = reference_logits(model, directions)
    stats = output_lens(directions, ckpt, k=5)
    top = expected.topk(5, dim=1)
    torch.testing.assert_close(stats.top_values, top.values, rtol=1e-4, atol=1e-5)
    assert torch.equal(stats.top_ids, top.indices)
    bottom = expected.topk(5, dim=1, largest=False)
    torch.testing.assert_close(stats.bottom_values, bottom.values, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats.mean, expected.mean(dim=1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats.std, expected.std(dim=1, correction=0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats.softmax_max, expected.softmax(dim=1).max(dim=1).values, rtol=1e-4, atol=1e-6)


def test_geometry_rejects_unknown_architecture(tmp_path):
    with pytest.raises(Exception, match="model_type 'gpt2' is not supported"):
        ModelGeometry.from_config({"model_type": "gpt2"}, tmp_path / "config.json")
