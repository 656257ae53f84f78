"""Every circuit of ``core.lens.circuits`` equals what transformers' own Gemma2/Llama modules compute.

Tiny random models (4 query / 2 kv heads, Gemma-2 with query_pre_attn_scalar != head_dim and both softcaps,
random norm gains, Llama untied) are saved sharded and read back by ``ModelCheckpoint``.

* QK reference: the layer's real eager attention module on the sequence [key, 0, query] with all position
  ids equal (5). RMSNorm(0) = 0, so the zero vector's key and its score are exactly 0; the query's own
  position is masked, so softmax weights w give the pre-softmax (post-softcap) logit = log(w_key / w_zero).
* OV reference: a one-position sequence (the query can attend only to the feature), o_proj's input captured
  and restricted to head h, then the real o_proj, Gemma's post_attention_layernorm, model.norm, lm_head and
  the final softcap as ``Gemma2ForCausalLM`` applies it.
* OV-writer reference: every token's embedding (``embed_tokens``) as a one-position sequence through the real
  attention module, o_proj restricted to head h, Gemma's post_attention_layernorm, dotted with the feature.
* Layer pairing: a direction placed in resid_post(L) with a forward hook on block L is what block L+1's
  q/k/v projections read (``input_layernorm`` of it) and leaves block L's attention inputs unchanged.
* Input lens reference: ``model.model.embed_tokens(ids)`` (Gemma's scaled embedding module) dotted with e_i.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from core.compute.engine import RowStats
from core.lens.circuits import (
    KINDS,
    PHASE_KINDS,
    PHASES,
    Circuit,
    VocabOperands,
    all_circuits,
    circuit_operands,
    circuit_scores,
    circuit_stats,
    input_lens,
    ov_write_norms,
    paired_layers,
)
from core.weights.model_weights import ModelCheckpoint
from tests.device import DEVICE, TINY

pytestmark = pytest.mark.unit

N_FEAT, K = 6, 5
TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module", params=["gemma2", "llama"])
def tiny(request, tmp_path_factory):
    """(model, checkpoint, operands, features) with attention scores of order 10 (softcaps engaged)."""
    arch = request.param
    torch.manual_seed(0)
    if arch == "gemma2":
        config = Gemma2Config(**TINY, query_pre_attn_scalar=24)
    else:
        config = LlamaConfig(**TINY, tie_word_embeddings=False)
    config._attn_implementation = "eager"  # returns the attention weights
    model = Gemma2ForCausalLM(config) if arch == "gemma2" else LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (0.0 if arch == "gemma2" else 1.0))
            elif "q_proj" in name or "k_proj" in name:
                p.normal_(0.0, 0.4)
            else:
                p.normal_(0.0, 1.0 if "embed" in name or "lm_head" in name else 0.3)
    model.eval()
    path = tmp_path_factory.mktemp(arch)
    model.save_pretrained(path, max_shard_size="60KB")
    ckpt = ModelCheckpoint(path)
    features = torch.randn(N_FEAT, 64, generator=torch.Generator().manual_seed(1))
    features /= features.norm(dim=1, keepdim=True)
    return model, ckpt, VocabOperands(ckpt, DEVICE), features


def token_vectors(model, phase: str) -> torch.Tensor:
    """The phase's token vectors as the model produces them: embed_tokens output or lm_head rows."""
    if phase == "encoder_embedding":
        return model.model.embed_tokens(torch.arange(model.config.vocab_size))
    return model.lm_head.weight


def rope(model, layer: int, hidden: torch.Tensor, position_ids: torch.Tensor):
    """The model's rotary embeddings for ``layer`` (Gemma 3: per layer type, sliding or full)."""
    if model.config.model_type.startswith("gemma3"):
        return model.model.rotary_emb(hidden, position_ids, model.config.layer_types[layer])
    return model.model.rotary_emb(hidden, position_ids)


@torch.no_grad()
def reference_qk(model, layer: int, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(n_heads, n_q, n_k) post-softcap, pre-softmax scores of the real module for every query/key pair."""
    n_q, n_k = len(queries), len(keys)
    q, k = queries.repeat_interleave(n_k, 0), keys.repeat(n_q, 1)
    block = model.model.layers[layer]
    hidden = block.input_layernorm(torch.stack([k, torch.zeros_like(k), q], dim=1))
    position_ids = torch.full((len(q), 3), 5)
    mask = torch.full((3, 3), torch.finfo(torch.float32).min)
    mask[0, 0] = mask[1, :2] = mask[2, :2] = 0.0  # the query sees {key, zero}, not itself
    _, weights = block.self_attn(
        hidden,
        position_embeddings=rope(model, layer, hidden, position_ids),
        attention_mask=mask.expand(len(q), 1, 3, 3),
    )
    logits = (weights[:, :, 2, 0] / weights[:, :, 2, 1]).log()  # (pairs, heads)
    return logits.T.reshape(-1, n_q, n_k)


@torch.no_grad()
def head_output(model, layer: int, head: int, vectors: torch.Tensor) -> torch.Tensor:
    """(n, 1, d_model) the real module's write of head ``head`` (o_proj of its columns only, then Gemma's
    post_attention_layernorm) when a one-position sequence holds each residual vector."""
    block, hd = model.model.layers[layer], model.config.head_dim
    hidden = block.input_layernorm(vectors[:, None, :])
    captured: list[torch.Tensor] = []
    hook = block.self_attn.o_proj.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    position_ids = torch.zeros(len(vectors), 1, dtype=torch.long)
    block.self_attn(hidden, position_embeddings=rope(model, layer, hidden, position_ids), attention_mask=None)
    hook.remove()
    per_head = torch.zeros_like(captured[0])
    per_head[..., head * hd : (head + 1) * hd] = captured[0][..., head * hd : (head + 1) * hd]
    out = block.self_attn.o_proj(per_head)
    if model.config.model_type.startswith("gemma"):  # Llama's post_attention_layernorm normalises the MLP input
        out = block.post_attention_layernorm(out)
    return out


@torch.no_grad()
def reference_ov(model, layer: int, head: int, features: torch.Tensor) -> torch.Tensor:
    """(n_feat, vocab) logits of head ``head``'s write when its query attends only to the feature."""
    logits = model.lm_head(model.model.norm(head_output(model, layer, head, features)))[:, 0]
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def assert_stats_match(stats: RowStats, full: torch.Tensor, k: int = K) -> None:
    """The engine's statistics equal those computed directly from the full score matrix."""
    scale = dict(rtol=1e-4, atol=1e-5 * float(full.abs().max()))
    top, bottom = full.topk(k, dim=1), full.topk(k, dim=1, largest=False)
    assert torch.equal(stats.top_ids, top.indices) and torch.equal(stats.bottom_ids, bottom.indices)
    torch.testing.assert_close(stats.top_values, top.values, **scale)
    torch.testing.assert_close(stats.bottom_values, bottom.values, **scale)
    torch.testing.assert_close(stats.mean, full.mean(1), **scale)
    torch.testing.assert_close(stats.std, full.std(1, correction=0), **scale)
    for q, got in ((0.5, stats.median), (0.75, stats.p75)):
        torch.testing.assert_close(got, torch.quantile(full, q, dim=1, interpolation="lower"), **scale)
    p = full.softmax(1)
    torch.testing.assert_close(stats.softmax_max, p.max(1).values, **TOL)
    torch.testing.assert_close(stats.softmax_entropy, -(p * p.clamp_min(1e-30).log()).sum(1), **TOL)
    torch.testing.assert_close(stats.topk_mass, p.topk(k, dim=1).values.sum(1), **TOL)


def test_qk_circuits_equal_real_attention_scores(tiny):
    assert_qk_circuits_match(*tiny)


def assert_qk_circuits_match(model, ckpt, operands, features) -> None:
    """Every QK circuit (both phases, both roles, every layer and head) equals the real module's
    pre-softmax scores, and its statistics equal those of the full score matrix."""
    g = ckpt.geometry
    for phase in PHASES:
        tokens = token_vectors(model, phase).detach()
        for layer in range(g.n_layers):
            as_query = reference_qk(model, layer, features, tokens)  # (heads, n_feat, vocab)
            as_key = reference_qk(model, layer, tokens, features).transpose(1, 2)
            # large enough that Gemma's softcap bends them, small enough that the weights in the
            # log-ratio stay normal float32 numbers (e^-80 > 2^-126)
            assert 5.0 < as_query.abs().max() < 80.0
            for head in range(g.n_heads):
                for kind, expected in (("qk_feature_query", as_query[head]), ("qk_feature_key", as_key[head])):
                    circuit = Circuit(phase, kind, layer, head)
                    # float32 on both sides with different reduction orders (thread count varies with load):
                    # errors of a few 1e-5 of the largest score, where scores cancel to near 0 (seen: 3e-5)
                    scale = dict(rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
                    torch.testing.assert_close(circuit_scores(features, circuit, operands), expected, **scale)
                    assert_stats_match(circuit_stats(features, circuit, operands, k=K), expected)


def test_ov_circuit_equals_real_head_write_logits(tiny):
    assert_ov_circuits_match(*tiny)


def assert_ov_circuits_match(model, ckpt, operands, features) -> None:
    """Every head's OV circuit equals the logits of the real module's write, in both phases."""
    g = ckpt.geometry
    for layer in range(g.n_layers):
        for head in range(g.n_heads):
            expected = reference_ov(model, layer, head, features)
            for phase in PHASES:  # the phase only says which directions are passed; the circuit is the same
                circuit = Circuit(phase, "ov", layer, head)
                torch.testing.assert_close(circuit_scores(features, circuit, operands), expected, **TOL)
                assert_stats_match(circuit_stats(features, circuit, operands, k=K), expected)


def test_ov_writer_equals_real_head_write_along_the_feature(tiny):
    model, ckpt, operands, features = tiny
    with torch.no_grad():
        tokens = token_vectors(model, "encoder_embedding")
        for layer in range(ckpt.geometry.n_layers):
            for head in range(ckpt.geometry.n_heads):
                expected = features @ head_output(model, layer, head, tokens)[:, 0].T  # (n_feat, vocab)
                circuit = Circuit("encoder_embedding", "ov_writer", layer, head)
                torch.testing.assert_close(circuit_scores(features, circuit, operands), expected, **TOL)
                assert_stats_match(circuit_stats(features, circuit, operands, k=K), expected)


def test_ov_write_norms_equal_the_real_head_write(tiny):
    model, ckpt, operands, features = tiny
    for layer in range(ckpt.geometry.n_layers):
        got = ov_write_norms(features, layer, operands)
        for head in range(ckpt.geometry.n_heads):
            block, hd = model.model.layers[layer], model.config.head_dim
            with torch.no_grad():  # the pre-post-norm write: o_proj of head h's columns
                v = block.self_attn.v_proj(block.input_layernorm(features))
                c = ckpt.geometry.kv_head(head)
                o = v[:, c * hd : (c + 1) * hd] @ block.self_attn.o_proj.weight[:, head * hd : (head + 1) * hd].T
            torch.testing.assert_close(got[:, head], o.norm(dim=1), **TOL)


@torch.no_grad()
def test_resid_post_L_is_read_by_layer_L_plus_1_only(tiny):
    """A direction written into resid_post(L) (the output of block L, what a resid_post(L) SAE reads) is
    what block L+1's attention normalises and projects, and block L's attention input does not change —
    the pairing ``paired_layers`` encodes."""
    model, ckpt, operands, features = tiny
    n_layers = ckpt.geometry.n_layers
    ids = torch.tensor([[1, 2, 3, 4]])
    for layer in range(n_layers - 1):
        seen: dict[int, torch.Tensor] = {}
        hooks = [
            model.model.layers[i].self_attn.q_proj.register_forward_pre_hook(
                lambda _, args, i=i, seen=seen: seen.__setitem__(i, args[0].clone())
            )
            for i in (layer, layer + 1)
        ]
        model(ids)
        before = dict(seen)
        place = model.model.layers[layer].register_forward_hook(
            lambda _, args, out: (
                (torch.cat([out[0][:, :-1], features[None, :1] * 7.0], 1), *out[1:])
                if isinstance(out, tuple)
                else torch.cat([out[:, :-1], features[None, :1] * 7.0], 1)
            )
        )
        model(ids)
        place.remove()
        for h in hooks:
            h.remove()
        torch.testing.assert_close(seen[layer], before[layer])  # layer L reads resid_pre(L): unchanged
        expected = model.model.layers[layer + 1].input_layernorm(features[:1] * 7.0)
        torch.testing.assert_close(seen[layer + 1][0, -1], expected[0], **TOL)
        assert paired_layers(layer, n_layers)["decoder_unembedding"] == [layer + 1]
        assert paired_layers(layer, n_layers)["encoder_embedding"] == [layer]
    assert paired_layers(n_layers - 1, n_layers)["decoder_unembedding"] == []
    assert paired_layers(1, n_layers, "all") == {
        "encoder_embedding": [0, 1],
        "decoder_unembedding": list(range(2, n_layers)),
    }


def test_input_lens_equals_embedding_module(tiny):
    model, ckpt, _, features = tiny
    with torch.no_grad():
        expected = features @ token_vectors(model, "encoder_embedding").T
    assert_stats_match(input_lens(features, ckpt, k=K, device=DEVICE), expected)


def test_stats_do_not_depend_on_the_memory_budget(tiny):
    _, ckpt, operands, features = tiny
    for circuit in all_circuits(ckpt.geometry)[: 2 * len(PHASES) * len(KINDS)]:
        whole = circuit_stats(features, circuit, operands, k=K)
        tiled = circuit_stats(features, circuit, operands, k=K, memory_budget_bytes=10_000)  # 2-row tiles
        # tiles of another height round the float32 matmul differently (~1e-7 relative); the entropy
        # lse - E[x] inherits that error at the scale of the scores
        atol = 1e-6 * float(torch.cat([whole.top_values, whole.bottom_values]).abs().max())
        for name in RowStats.__dataclass_fields__:
            a, b = getattr(whole, name), getattr(tiled, name)
            assert torch.equal(a, b) if name.endswith("ids") else torch.allclose(a, b, rtol=1e-6, atol=atol), name


def test_bf16_stays_within_the_rounding_bound(tiny):
    """bf16 rounds both operands (unit roundoff u = 2^-8 each) and the matmul output; with float32
    accumulation |score_bf16 - score_fp32| <= (2u + u²)·Σ_j |l_j r_j| + u·|l·r|, and softcap is 1-Lipschitz,
    so every order statistic and the mean of a row move by at most that row's largest bound."""
    _, ckpt, operands, features = tiny
    u = 2.0**-8
    for circuit in all_circuits(ckpt.geometry)[: len(PHASES) * len(KINDS)]:
        left, right, _ = circuit_operands(features, circuit, operands)
        bound = ((2 * u + u * u) * (left.abs() @ right.abs().T) + u * (left @ right.T).abs()).max(1).values
        exact = circuit_stats(features, circuit, operands, k=K)
        rough = circuit_stats(features, circuit, operands, k=K, compute_dtype=torch.bfloat16)
        for name in ("top_values", "bottom_values", "mean", "median", "p75"):
            diff = (getattr(rough, name) - getattr(exact, name)).abs()
            assert (diff.reshape(N_FEAT, -1) <= bound[:, None] * 1.01 + 1e-6).all(), (circuit, name)


def test_all_circuits_and_operand_reuse(tiny):
    """Every (phase, kind, layer, head) once; with the circuits as its plan, ``VocabOperands`` computes each
    vocabulary operand once, keeps at most one between circuits and none while it computes another (one
    (vocab, head_dim) operand alive at a time)."""
    _, ckpt, _, _ = tiny
    g = ckpt.geometry
    circuits = all_circuits(g)
    per_layer_head = sum(len(kinds) for kinds in PHASE_KINDS.values())
    assert len(set(circuits)) == len(circuits) == per_layer_head * g.n_layers * g.n_heads
    paired = all_circuits(g, paired_layers(0, g.n_layers))
    assert {(c.phase, c.layer) for c in paired} == {("encoder_embedding", 0), ("decoder_unembedding", 1)}
    operands = VocabOperands(ckpt, DEVICE, plan=circuits)
    computed, kept, held_while_computing = [], [], []
    compute = operands._compute

    def counted(c):
        computed.append(operands.operand_key(c))
        held_while_computing.append(len(operands._kept))
        return compute(c)

    operands._compute = counted
    for c in circuits:
        operands.right(c)
        kept.append(len(operands._kept))
    assert len(computed) == len(set(computed))  # each operand once
    assert {operands.operand_key(c) for c in circuits} == set(computed)
    assert max(kept) == 1 and kept[-1] == 0  # only a kv group's keys wait for the group's next head; none left
    assert g.n_heads > g.n_kv_heads and max(held_while_computing) == 0  # the group's heads use its keys back to back
    assert sum(key[0] == "k" for key in computed) == g.n_layers * g.n_kv_heads
    unplanned = VocabOperands(ckpt, DEVICE)
    assert unplanned.right(circuits[0]) is not unplanned.right(circuits[0])  # no plan: nothing kept
    with pytest.raises(ValueError, match="unknown phase/kind"):
        Circuit("encoder_embedding", "qk", 0, 0)
