"""Input-side and attention circuits of SAE features, each one configuration of ``core.compute.engine.row_stats``.

Notation (transformers ``modeling_gemma2.py`` / ``modeling_gemma3.py`` / ``modeling_llama.py``): n_l(x) = RMSNorm
with layer l's ``input_layernorm`` gain, ``x / sqrt(mean(x²) + eps) ⊙ g_l``; W_Q^h, W_K^c, W_V^c are the (head_dim,
d_model) row blocks of q/k/v_proj for query head h and kv head c = kv(h) = h // (n_heads / n_kv_heads) (GQA,
``repeat_kv``); W_O^h is the (d_model, head_dim) column block h of o_proj; s = attn_scale
(``query_pre_attn_scalar^-1/2`` on Gemma-2/3, ``head_dim^-1/2`` on Llama); cap_attn = 50 and cap_final = 30
on Gemma-2 (``eager_attention_forward``'s and ``Gemma2ForCausalLM``'s ``c·tanh(x/c)``), none on Llama.

Input lens (encoder–embedding): ``score_i(t) = e_i · (σ W_E[t])`` with σ = sqrt(d_model) on Gemma-2/3 (as
``Gemma2TextScaledWordEmbedding`` multiplies, in float32 here; a bf16 model rounds σ to bf16, e.g.
sqrt(3584) → 60.0) and 1 on Llama.

Attention circuits, for every (phase, layer l, query head h); the feature vector f_i and token vectors
x_t depend on the phase:

* ``"encoder_embedding"``: f_i = unit encoder direction e_i, x_t = σ W_E[t] (the model's input embedding);
* ``"decoder_unembedding"``: f_i = unit decoder direction d_i, x_t = W_U[t] (``lm_head`` rows; = W_E if tied).

Each vector enters layer l alone, as the residual stream at one position, through n_l. Query and key
get the SAME position id (distance 0): RoPE rotates q and k by the same angle, R(p)q · R(p)k = q · k, so the
content term is isolated and no position has to be chosen.

Gemma 3 adds a per-head RMSNorm to queries and keys after the projection and before RoPE (``q_norm``/``k_norm``,
gains γ_Q, γ_K of size head_dim, 1 + w, shared by the layer's heads): below, read W_Q^h n_l(·) as
ν_Q(W_Q^h n_l(·)) and W_K^c n_l(·) as ν_K(W_K^c n_l(·)) with ν(y) = y / sqrt(mean(y²) + eps) ⊙ γ, eps the model's
rms_norm_eps. ν is applied to each side's head_dim vector before the bilinear product, so the score stays a
rank-head_dim bilinear form and RoPE still cancels at distance 0. Gemma 3 has no attention softcap
(cap_attn = none) and a final softcap only if its config sets one; its sliding-window layers differ from its
global layers only in the mask and the RoPE base, neither of which acts at distance 0, so both are read the same.

* ``"qk_feature_query"``: score(i, t) = softcap_attn(s · (W_Q^h n_l(f_i)) · (W_K^c n_l(x_t))) — the feature
  is the query. Softmax over t = the attention distribution the feature's query puts on a context that
  holds every token once as a key at distance 0.
* ``"qk_feature_key"``: score(i, t) = softcap_attn(s · (W_Q^h n_l(x_t)) · (W_K^c n_l(f_i))) — the feature is
  the key. Softmax over t (the engine's row softmax) is NOT an attention distribution (those normalise over
  keys): it is a Boltzmann distribution over the query tokens that most select the feature.
* ``"ov"``: o_i = W_O^h W_V^c n_l(f_i) (what head h writes when it attends only to the feature); on Gemma-2/3
  then the layer's ``post_attention_layernorm`` (gain g_post); logits(i, t) = softcap_final(W_U[t] ·
  FinalNorm(o_i)). Softmax over t = the next-token distribution if that write were the whole residual stream.
* ``"ov_writer"``: score(i, t) = f_i · Post_l(W_O^h W_V^c n_l(x_t)) with Post_l = the post-attention norm on
  Gemma-2/3 (g_post ⊙ o / rms(o)) and the identity on Llama — how strongly head h, attending only to token t,
  writes along the feature's (encoder) direction: the circuit that WRITES what the encoder reads.

Layer pairing (``paired_layers``). A resid_post(L) SAE's features live in the residual stream after block L:
attention layers > L READ the decoder direction there (decoder–unembedding circuits), layers ≤ L WROTE what the
encoder direction reads (encoder–embedding writer circuit). Default scope ``"adjacent"``: writer L, reader L+1
(the last layer's SAE has no reader); ``"all"``: writers 0..L and readers L+1..N−1. Which kinds each phase
analyses is ``PHASE_KINDS``: encoder–embedding → ``ov_writer`` (token embeddings written into the encoder
direction); decoder–unembedding → ``qk_feature_query``, ``qk_feature_key`` (the decoder direction as query /
as key against the unembedding rows) and ``ov`` (the decoder direction moved to logits), plus the head's write
norm ``ov_write_norms``. Which of them a run computes is a circuit set (``CIRCUIT_SETS``): ``"used"``, the
default, is what the classes and claims read (``core.analysis.profiles.SCORE_KINDS``: ``ov_writer``, the two QK kinds,
and the write norms); ``"all"`` adds the decoder-side ``ov`` circuit (its logit distributions go to
``circuit_stats`` for users' own queries; on Gemma-2-2B it is a quarter of the circuit time). The encoder-side QK
circuits and the decoder-side ``ov_writer`` stay computable
(``Circuit`` accepts every phase × kind) but are not analysed: the encoder direction never sits in the stream
that layer L's queries and keys read.

Pre-softmax statistics are the engine's value statistics (top/bottom-k, mean, std, median, p75); the
post-softmax ones are ``softmax_max``, ``softmax_entropy``, ``topk_mass`` over the whole vocabulary.

Every score is a rank-``head_dim`` bilinear form, so the engine receives (n_feat, head_dim) and
(vocab, head_dim) operands. Because RMSNorm is a per-vector scalar times a gain, n_l(x_t) = ρ_t · (x_t ⊙ g_l)
with ρ_t = 1/sqrt(mean(x_t²) + eps), and the vocabulary operands are ``keys = ρ ⊙ (X @ (W_K^c ⊙ g_l)ᵀ)``,
``queries = ρ ⊙ (X @ (W_Q^h ⊙ g_l)ᵀ)`` (then ν_K / ν_Q row-wise on Gemma 3; s is folded into the feature-side
operand of both QK kinds) and,
for OV, ``U_h = W_U @ (g ⊙ W_O^h)`` with g = g_post ⊙ g_final (Gemma-2/3) or g_final
(Llama) and the feature side ``c_i · W_V^c n_l(f_i)``, c_i the product of the two norms' 1/rms factors
(FinalNorm(PostNorm(o)) = c · (g ⊙ o)). ``ov_writer``: right ``v_t = ρ_t (X @ (W_V^c ⊙ g_l)ᵀ)`` (times
1/rms(W_O^h v_t) on Gemma, from the head_dim Gram matrix (W_O^h)ᵀW_O^h), left ``(f_i ⊙ g_post) @ W_O^h``. So no
vocab × d_model matrix is formed beyond W_E / W_U themselves.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from core.compute.engine import RowStats, row_stats
from core.lens.forward import rms_normalize, softcap
from core.weights.model_weights import AttentionWeights, ModelCheckpoint, ModelGeometry

PHASES = ("encoder_embedding", "decoder_unembedding")
KINDS = ("qk_feature_query", "qk_feature_key", "ov", "ov_writer")
PHASE_KINDS: dict[str, tuple[str, ...]] = {
    "encoder_embedding": ("ov_writer",),
    "decoder_unembedding": ("qk_feature_query", "qk_feature_key", "ov"),
}
LAYER_SCOPES = ("adjacent", "all")
CIRCUIT_SETS: dict[str, dict[str, tuple[str, ...]]] = {  # name -> the kinds computed per phase (module doc)
    "used": {"encoder_embedding": ("ov_writer",), "decoder_unembedding": ("qk_feature_query", "qk_feature_key")},
    "all": PHASE_KINDS,
}


@dataclass(frozen=True)
class Circuit:
    """One attention circuit: the phase (which feature/token vectors), the kind, layer and query head."""

    phase: str  # one of PHASES
    kind: str  # one of KINDS
    layer: int
    head: int  # query head; its kv head is geometry.kv_head(head)

    def __post_init__(self) -> None:
        if self.phase not in PHASES or self.kind not in KINDS:
            raise ValueError(f"unknown phase/kind {self.phase!r}/{self.kind!r}; phases {PHASES}, kinds {KINDS}")


def paired_layers(sae_layer: int, n_layers: int, scope: str = "adjacent") -> dict[str, list[int]]:
    """Attention layers per phase for a resid_post(``sae_layer``) SAE (module doc, "Layer pairing"):
    ``"adjacent"`` → writer [L], reader [L+1] (none for the last layer); ``"all"`` → writers 0..L, readers
    L+1..N−1."""
    if not 0 <= sae_layer < n_layers:
        raise ValueError(f"SAE layer {sae_layer} outside the model's 0..{n_layers - 1}")
    if scope == "adjacent":
        return {
            "encoder_embedding": [sae_layer],
            "decoder_unembedding": [sae_layer + 1] if sae_layer + 1 < n_layers else [],
        }
    if scope == "all":
        return {
            "encoder_embedding": list(range(sae_layer + 1)),
            "decoder_unembedding": list(range(sae_layer + 1, n_layers)),
        }
    raise ValueError(f"layer scope {scope!r} is not one of {LAYER_SCOPES}")


def all_circuits(
    geometry: ModelGeometry,
    layers: Mapping[str, Sequence[int]] | None = None,
    kinds: Mapping[str, tuple[str, ...]] = PHASE_KINDS,
) -> list[Circuit]:
    """The circuits of ``kinds`` (default: every analysed kind, ``PHASE_KINDS``; or a ``CIRCUIT_SETS`` entry) at
    each phase's ``layers`` (default: every layer for both phases), ordered layer → kv group → phase → kind → query
    head of the group: the circuits that share a kv group's keys (``qk_feature_query`` of the group's query heads)
    follow each other, so ``VocabOperands`` never holds a kept operand while it computes another."""
    every = range(geometry.n_layers)
    chosen = {phase: set(every if layers is None else layers.get(phase, ())) for phase in PHASES}
    per_group = geometry.n_heads // geometry.n_kv_heads
    return [
        Circuit(phase, kind, layer, head)
        for layer in every
        for group in range(geometry.n_kv_heads)
        for phase in PHASES
        if layer in chosen[phase]
        for kind in kinds.get(phase, ())
        for head in range(group * per_group, (group + 1) * per_group)
    ]


class VocabOperands:
    """The vocabulary-side operands of one checkpoint's circuits, computed on ``device`` in float32.

    Holds W_E and W_U (one tensor if tied), the per-token 1/rms factors per phase and one layer's attention weights.
    A (vocab, head_dim) operand (262 MB at Gemma-2's 256000 x 256) is kept exactly while a circuit of ``plan`` (the
    circuits the caller will ask for, in any order) still needs it, and dropped after its last use; without a plan
    none is kept. Only a kv group's keys serve several circuits (the query heads of the group), and
    ``all_circuits`` puts those circuits next to each other: an operand is kept only from one circuit to the next,
    never while another is computed (one (vocab, head_dim) operand alive at a time).
    """

    def __init__(
        self, checkpoint: ModelCheckpoint, device: str | torch.device | None = None, plan: Sequence[Circuit] = ()
    ) -> None:
        self.checkpoint = checkpoint
        self.geometry = checkpoint.geometry
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        embedding = checkpoint.embedding().to(self.device)
        unembedding = embedding if self.geometry.tied_embeddings else checkpoint.unembedding().to(self.device)
        self.raw = {"encoder_embedding": embedding, "decoder_unembedding": unembedding}
        self.final_gain = checkpoint.final_norm_gain().to(self.device)
        self._inv_rms: dict[str, Tensor] = {}
        self._layer: tuple[int, AttentionWeights] | None = None
        self._uses_left = Counter(self.operand_key(c) for c in plan)
        self._kept: dict[tuple, Tensor] = {}

    def token_scale(self, phase: str) -> float:
        """σ for the phase's token vectors: the embedding scale for inputs, 1 for unembedding rows."""
        return self.geometry.embedding_scale if phase == "encoder_embedding" else 1.0

    def inv_rms(self, phase: str) -> Tensor:
        """(vocab,) factors ρ_t = σ / sqrt(mean((σ X[t])²) + eps), so that n_l(σ X[t]) = ρ_t · (X[t] ⊙ g_l)."""
        if phase not in self._inv_rms:
            sigma = self.token_scale(phase)
            # in row blocks: raw.pow(2) whole would be a second (vocab, d_model) matrix (2.4 GB at Gemma-2-2B)
            mean_sq = torch.cat([rows.pow(2).mean(1) for rows in self.raw[phase].split(16384)]) * sigma**2
            self._inv_rms[phase] = torch.rsqrt(mean_sq + self.geometry.rms_norm_eps) * sigma
        return self._inv_rms[phase]

    def attention(self, layer: int) -> AttentionWeights:
        """Layer ``layer``'s weights on the device (the last layer asked for is kept)."""
        if self._layer is None or self._layer[0] != layer:
            self._layer = (layer, self.checkpoint.attention(layer).to(self.device))
        return self._layer[1]

    def operand_key(self, circuit: Circuit) -> tuple[str | int, ...]:
        """What ``circuit``'s operand depends on: circuits with one key share one operand."""
        c, g = circuit, self.geometry
        if c.kind == "qk_feature_query":
            return ("k", c.phase, c.layer, g.kv_head(c.head))
        if c.kind == "qk_feature_key":
            return ("q", c.phase, c.layer, c.head)
        if c.kind == "ov_writer":
            return ("w", c.phase, c.layer, c.head)
        return ("u", c.layer, c.head)  # phase-independent

    def right(self, circuit: Circuit) -> Tensor:
        """The (vocab, head_dim) operand of ``circuit``: token keys, token queries or U_h (see module doc); counts
        as one use of the plan."""
        key = self.operand_key(circuit)
        operand = self._kept.pop(key, None)
        if operand is None:
            operand = self._compute(circuit)
        if self._uses_left[key] > 0:
            self._uses_left[key] -= 1
        if self._uses_left[key] > 0:
            self._kept[key] = operand
        return operand

    def _compute(self, c: Circuit) -> Tensor:
        """``c``'s operand, computed (module doc: keys, queries, U_h or the writer's v_t)."""
        g = self.geometry
        w = self.attention(c.layer)
        if c.kind == "ov":
            out_gain = self.final_gain if w.output_gain is None else self.final_gain * w.output_gain
            operand = self.raw["decoder_unembedding"] @ (out_gain[:, None] * _head_cols(w.o, c.head, g))
        elif c.kind == "ov_writer":
            operand = self._token_projection(c.phase, _head_rows(w.v, g.kv_head(c.head), g), w)  # v_t
            if w.output_gain is not None:  # Gemma-2/3 post-attention norm: 1/rms(W_O^h v_t) per token
                o = _head_cols(w.o, c.head, g)
                mean_sq = _row_quadratic(operand, o.T @ o) / g.d_model
                operand.mul_(torch.rsqrt(mean_sq + g.rms_norm_eps)[:, None])
        else:
            proj = _head_rows(w.k, g.kv_head(c.head), g) if c.kind == "qk_feature_query" else _head_rows(w.q, c.head, g)
            operand = self._token_projection(c.phase, proj, w)
            operand = _head_norm(operand, w.k_norm_gain if c.kind == "qk_feature_query" else w.q_norm_gain, g)
        return operand

    def _token_projection(self, phase: str, proj: Tensor, w: AttentionWeights) -> Tensor:
        """(vocab, head_dim) ``ρ_t · (X[t] @ (proj ⊙ g_l)ᵀ)`` = proj applied to n_l(σ X[t]) (scaled in place: one
        (vocab, head_dim) tensor at a time)."""
        return (self.raw[phase] @ (proj * w.input_gain).T).mul_(self.inv_rms(phase)[:, None])


def circuit_operands(
    features: Tensor, circuit: Circuit, operands: VocabOperands
) -> tuple[Tensor, Tensor, float | None]:
    """``(left, right, cap)`` with scores = softcap(left @ rightᵀ, cap), exactly what the engine receives.

    ``features`` are the phase's feature directions f_i as rows (n_feat, d_model): unit encoder directions
    for ``"encoder_embedding"``, unit decoder directions for ``"decoder_unembedding"``.
    """
    g, c = operands.geometry, circuit
    w = operands.attention(c.layer)
    f = features.to(operands.device, torch.float32)
    if c.kind == "ov_writer":  # the feature reads the head's write: left = (f ⊙ g_post) @ W_O^h
        gain = w.output_gain if w.output_gain is not None else torch.ones_like(w.input_gain)
        return (f * gain) @ _head_cols(w.o, c.head, g), operands.right(c), None
    normed = rms_normalize(f, w.input_gain, g.rms_norm_eps)
    if c.kind == "ov":
        value, written = head_write(normed, w, c.head, g)
        scale = torch.rsqrt(written.pow(2).mean(1) + g.rms_norm_eps)
        if w.output_gain is not None:  # Gemma-2/3: FinalNorm(PostNorm(o)); the second 1/rms is of PostNorm(o)
            post = written * scale[:, None] * w.output_gain
            scale = scale * torch.rsqrt(post.pow(2).mean(1) + g.rms_norm_eps)
        left, cap = value * scale[:, None], g.final_softcap
    else:
        query_side = c.kind == "qk_feature_query"
        proj = _head_rows(w.q, c.head, g) if query_side else _head_rows(w.k, g.kv_head(c.head), g)
        head = _head_norm(normed @ proj.T, w.q_norm_gain if query_side else w.k_norm_gain, g)
        left, cap = g.attn_scale * head, g.attn_softcap
    return left, operands.right(c), cap


def circuit_scores(features: Tensor, circuit: Circuit, operands: VocabOperands) -> Tensor:
    """The full (n_feat, vocab) score matrix of ``circuit``, on the CPU — for small shapes (tests, inspection)
    only."""
    left, right, cap = circuit_operands(features, circuit, operands)
    return softcap(left @ right.T, cap).cpu()


def circuit_stats(
    features: Tensor,
    circuit: Circuit,
    operands: VocabOperands,
    *,
    k: int = 10,
    compute_dtype: torch.dtype = torch.float32,
    memory_budget_bytes: int = 1 << 30,
    progress: Callable[[int, int], None] | None = None,
) -> RowStats:
    """Per-feature statistics over the vocabulary of ``circuit``'s scores (module docstring), streamed."""
    left, right, cap = circuit_operands(features, circuit, operands)
    return row_stats(
        left,
        right,
        k=k,
        softcap=cap,
        compute_dtype=compute_dtype,
        device=operands.device,
        memory_budget_bytes=memory_budget_bytes,
        progress=progress,
    )


def input_lens(
    encoder_dirs: Tensor,
    checkpoint: ModelCheckpoint,
    *,
    k: int = 10,
    compute_dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    memory_budget_bytes: int = 1 << 30,
    progress: Callable[[int, int], None] | None = None,
) -> RowStats:
    """Statistics over t of ``e_i · (σ W_E[t])`` (σ folded into the left operand) for each row e_i."""
    return row_stats(
        encoder_dirs.to(torch.float32) * checkpoint.geometry.embedding_scale,
        checkpoint.embedding(),
        k=k,
        compute_dtype=compute_dtype,
        device=device,
        memory_budget_bytes=memory_budget_bytes,
        progress=progress,
    )


def head_write(normed: Tensor, w: AttentionWeights, head: int, g: ModelGeometry) -> tuple[Tensor, Tensor]:
    """``(v, o)``: the value ``v = W_V^c x`` (n, head_dim) and the write ``o = W_O^h v`` (n, d_model) of
    query head ``head`` attending only to a position holding ``x`` (rows of ``normed`` = n_l(·)). The one
    home of the OV write (``ov`` circuits and ``ov_write_norms``); checked against transformers in
    tests/test_circuits_fidelity.py."""
    value = normed @ _head_rows(w.v, g.kv_head(head), g).T
    return value, value @ _head_cols(w.o, head, g).T


def ov_write_norms(directions: Tensor, layer: int, operands: VocabOperands) -> Tensor:
    """(n, n_heads) ``‖W_O^h W_V^c n_l(f_i)‖`` of layer ``layer``: how far each head moves each direction
    when it attends only to it (before Gemma's post-attention norm; the pipeline uses it only relative to
    random directions through the same head, ``core.analysis.profiles``)."""
    g, w = operands.geometry, operands.attention(layer)
    normed = rms_normalize(directions.to(operands.device, torch.float32), w.input_gain, g.rms_norm_eps)
    return torch.stack([head_write(normed, w, h, g)[1].norm(dim=1) for h in range(g.n_heads)], dim=1).cpu()


def _row_quadratic(x: Tensor, gram: Tensor, block: int = 16384) -> Tensor:
    """``xᵢ · (gram xᵢ)`` per row of x, in row blocks (temporaries of ``block`` rows, not of x's size)."""
    return torch.cat([((part @ gram) * part).sum(1) for part in x.split(block)])


def _head_norm(x: Tensor, gain: Tensor | None, g: ModelGeometry) -> Tensor:
    """Gemma 3's per-head query/key RMSNorm over the last (head_dim) axis, ``x / sqrt(mean(x²) + eps) ⊙ gain``
    (``Gemma3Attention.q_norm`` / ``k_norm``, before RoPE); identity where the model has none (gain None)."""
    return x if gain is None else rms_normalize(x, gain, g.rms_norm_eps)


def _head_rows(weight: Tensor, head: int, g: ModelGeometry) -> Tensor:
    """Rows ``head·head_dim : (head+1)·head_dim`` of a q/k/v_proj weight, (head_dim, d_model)."""
    return weight[head * g.head_dim : (head + 1) * g.head_dim]


def _head_cols(weight: Tensor, head: int, g: ModelGeometry) -> Tensor:
    """Columns of o_proj that read query head ``head``'s output, (d_model, head_dim)."""
    return weight[:, head * g.head_dim : (head + 1) * g.head_dim]
