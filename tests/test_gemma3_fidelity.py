"""Gemma 3 geometry: the output lens, input lens and every QK/OV circuit equal what transformers' own Gemma 3 text
modules (``Gemma3ForCausalLM``, ``Gemma3TextConfig``) compute, fp32, relative tolerance 1e-4.

Tiny random models (4 query / 2 kv heads, query_pre_attn_scalar 24 != head_dim, sliding and full layers, random
``1 + w`` gains on every norm including the per-head ``q_norm`` / ``k_norm``) are saved sharded by transformers and
read back by ``ModelCheckpoint``. The references follow ``tests/test_circuits_fidelity.py``:

* output lens: the full forward of a model whose blocks write nothing (o_proj and down_proj zeroed);
* QK: the layer's real eager attention on [key, 0, query] at one position id; RMSNorm(0) = 0 and q/k_norm(0) = 0,
  so the zero key scores exactly 0 and log(w_key / w_zero) is the pre-softmax logit;
* OV: one position, o_proj's input restricted to head h, then o_proj, post_attention_layernorm, model.norm,
  lm_head and the final softcap as ``Gemma3ForCausalLM`` applies it.

One model sets ``attn_logit_softcapping: 50`` in its config, which ``Gemma3Attention`` never applies (nor does the
geometry), and ``final_logit_softcapping: 30``, which both apply.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from core.lens.circuits import Circuit, VocabOperands, circuit_scores, input_lens
from core.lens.output_lens import output_lens
from core.weights.model_weights import INDEX_FILE, ModelCheckpoint, ModelGeometry
from tests.device import DEVICE, TINY
from tests.test_circuits_fidelity import assert_ov_circuits_match, assert_qk_circuits_match, assert_stats_match

pytestmark = pytest.mark.unit

GEMMA3 = dict(
    **TINY,
    query_pre_attn_scalar=24,
    sliding_window=4,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
)
CAPS = {"plain": {}, "capped": {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}}
N_FEAT, K = 6, 5


def build(caps: dict, path) -> Gemma3ForCausalLM:
    torch.manual_seed(0)
    config = Gemma3TextConfig(**GEMMA3, **caps)
    config._attn_implementation = "eager"  # returns the attention weights
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_norm" in name or "k_norm" in name:  # gains ~2.5 so that scores reach ~10 through the head norms
                p.copy_(torch.randn_like(p) * 0.3 + 1.5)
            elif "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3)
            else:
                p.normal_(0.0, 1.0 if "embed" in name else 0.3)
    model.eval()
    model.save_pretrained(path, max_shard_size="60KB")
    return model


@pytest.fixture(scope="module", params=list(CAPS))
def tiny(request, tmp_path_factory):
    """(model, checkpoint, operands, unit features)."""
    path = tmp_path_factory.mktemp(request.param)
    model = build(CAPS[request.param], path)
    ckpt = ModelCheckpoint(path)
    features = torch.randn(N_FEAT, 64, generator=torch.Generator().manual_seed(1))
    features /= features.norm(dim=1, keepdim=True)
    return model, ckpt, VocabOperands(ckpt, DEVICE), features


def test_geometry_reads_the_gemma3_config(tiny):
    model, ckpt, _, _ = tiny
    g, cfg = ckpt.geometry, model.config
    assert (g.architecture, g.d_model, g.n_layers, g.n_heads, g.n_kv_heads, g.head_dim, g.vocab_size) == (
        "gemma3",
        64,
        3,
        4,
        2,
        16,
        300,
    )
    assert g.tied_embeddings and g.qk_norm and g.post_attention_norm and g.tensor_prefix == "model."
    assert g.attn_scale == pytest.approx(24**-0.5) and g.embedding_scale == 8.0 and g.norm_offset == 1.0
    assert g.attn_softcap is None  # Gemma3Attention ignores attn_logit_softcapping
    assert g.final_softcap == cfg.final_logit_softcapping
    assert g.layer_types == tuple(cfg.layer_types) and g.sliding_window == 4
    assert len(set(ckpt.weight_map.values())) >= 2
    needed = ModelCheckpoint.needed_tensors(g)
    assert "model.layers.2.self_attn.k_norm.weight" in needed and set(needed) <= set(ckpt.weight_map)
    assert not [n for n in needed if "feedforward" in n or "mlp" in n]  # pre/post-FF norms and MLP never read
    w = ckpt.attention(1)
    torch.testing.assert_close(w.q_norm_gain, 1 + model.model.layers[1].self_attn.q_norm.weight.detach())
    torch.testing.assert_close(ckpt.unembedding(), model.lm_head.weight.detach())


def test_output_lens_equals_transformers_logits(tiny):
    model, ckpt, _, _ = tiny
    zeroed = Gemma3ForCausalLM(model.config).eval()
    zeroed.load_state_dict(model.state_dict())
    with torch.no_grad():
        for layer in zeroed.model.layers:  # blocks add nothing: the residual stream passes unchanged
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    directions = torch.randn(37, 64, generator=torch.Generator().manual_seed(2))
    directions /= directions.norm(dim=1, keepdim=True)
    directions[0] *= 25.0
    with torch.no_grad():  # transformers 5 scales by sqrt(d_model) inside embed_tokens: inputs_embeds enter as is
        expected = zeroed(inputs_embeds=directions[:, None, :]).logits[:, 0].float()
    assert_stats_match(output_lens(directions, ckpt, k=K), expected)


def test_qk_circuits_equal_real_attention_scores(tiny):
    assert_qk_circuits_match(*tiny)


def test_qk_norm_is_not_optional(tiny):
    """Dropping the q/k head norms changes the scores: the fold is what makes the circuits match."""
    model, ckpt, operands, features = tiny
    circuit = Circuit("encoder_embedding", "qk_feature_query", 0, 0)
    with_norm = circuit_scores(features, circuit, operands)
    bare = VocabOperands(ckpt, DEVICE)
    bare._layer = (
        0,
        ckpt.attention(0).__class__(**{**vars(ckpt.attention(0)), "q_norm_gain": None, "k_norm_gain": None}),
    )
    assert not torch.allclose(circuit_scores(features, circuit, bare), with_norm, rtol=1e-2)


def test_ov_circuit_equals_real_head_write_logits(tiny):
    assert_ov_circuits_match(*tiny)


def test_input_lens_equals_scaled_embedding_module(tiny):
    model, ckpt, _, features = tiny
    with torch.no_grad():
        expected = features @ model.model.embed_tokens(torch.arange(model.config.vocab_size)).T
    assert_stats_match(input_lens(features, ckpt, k=K, device=DEVICE), expected)


def test_sliding_window_never_masks_distance_zero(tiny):
    """In the real model a sliding layer masks keys >= window positions back, never the query's own position:
    the distance-0 circuits are the same map in sliding and full layers."""
    model, _, _, _ = tiny
    n, window = 9, model.config.sliding_window
    with torch.no_grad():
        out = model(input_ids=torch.arange(n)[None] + 3, output_attentions=True)
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    for layer, kind in enumerate(model.config.layer_types):
        weights = out.attentions[layer][0]  # (heads, n, n)
        assert (weights.diagonal(dim1=1, dim2=2) > 0).all()
        far = (i - j >= window) & (j <= i)
        assert bool((weights[:, far] == 0).all()) == (kind == "sliding_attention")


def test_multimodal_wrapper_layout_reads_the_same_geometry(tiny, tmp_path):
    """``model_type: gemma3`` (Gemma3ForConditionalGeneration, e.g. google/gemma-3-4b-pt): text fields under
    ``text_config``, tensors under ``language_model.model.``; same lens and circuits as the flat checkpoint."""
    model, ckpt, operands, features = tiny
    flat = json.loads((ckpt.root / "config.json").read_text())
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "gemma3",
                "architectures": ["Gemma3ForConditionalGeneration"],
                "tie_word_embeddings": True,
                "text_config": {k: v for k, v in flat.items() if k not in ("architectures", "tie_word_embeddings")},
            }
        )
    )
    index = json.loads((ckpt.root / INDEX_FILE).read_text())
    index["weight_map"] = {"language_model." + k: v for k, v in index["weight_map"].items()}
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    for shard in set(index["weight_map"].values()):
        save_file({"language_model." + k: v for k, v in load_file(ckpt.root / shard).items()}, str(tmp_path / shard))
    wrapped = ModelCheckpoint(tmp_path)
    assert wrapped.geometry.tensor_prefix == "language_model.model."
    assert {**vars(wrapped.geometry), "tensor_prefix": "model."} == vars(ckpt.geometry)
    assert set(ModelCheckpoint.needed_tensors(wrapped.geometry)) <= set(wrapped.weight_map)
    torch.testing.assert_close(
        output_lens(features, wrapped, k=K).top_values, output_lens(features, ckpt, k=K).top_values
    )
    circuit = Circuit("encoder_embedding", "qk_feature_key", 2, 3)
    torch.testing.assert_close(
        circuit_scores(features, circuit, VocabOperands(wrapped, DEVICE)), circuit_scores(features, circuit, operands)
    )


def test_sparse_config_takes_transformers_defaults():
    """Fields a Gemma 3 config leaves out resolve as transformers' Gemma3TextConfig resolves them."""
    sparse = {"hidden_size": 2560, "num_hidden_layers": 34, "sliding_window": 1024, "intermediate_size": 10240}
    g = ModelGeometry.from_config({"model_type": "gemma3", "text_config": sparse})
    ref = Gemma3TextConfig(**sparse)
    assert (g.n_heads, g.n_kv_heads, g.head_dim, g.vocab_size, g.rms_norm_eps) == (
        ref.num_attention_heads,
        ref.num_key_value_heads,
        ref.head_dim,
        ref.vocab_size,
        ref.rms_norm_eps,
    )
    assert g.attn_scale == pytest.approx(ref.query_pre_attn_scalar**-0.5)
    assert g.layer_types == tuple(ref.layer_types) and g.tied_embeddings == ref.tie_word_embeddings
    assert g.final_softcap is None and g.attn_softcap is None
    with pytest.raises(Exception, match="layer_types has 2 entries for 34 layers"):
        ModelGeometry.from_config({"model_type": "gemma3_text", **sparse, "layer_types": ["full_attention"] * 2})
