"""Model geometry from ``config.json`` and lazy reads of only the tensors the analysis needs.

Never instantiates the model: tensors are read by name from (sharded) safetensors through
``model.safetensors.index.json`` (``weight_map``: tensor name → shard file) with ``safe_open``, or from
a single ``model.safetensors``. Tensor names are transformers' own (``model.embed_tokens.weight``,
``model.layers.{l}.self_attn.q_proj.weight``, ...).

Geometry facts (transformers ``modeling_gemma2.py`` / ``modeling_llama.py``):
- RMSNorm: ``x / sqrt(mean(x²) + eps) · g`` with ``g = 1 + w`` for Gemma-2 and ``g = w`` for Llama.
- Gemma-2 scales input embeddings by ``sqrt(d_model)`` (cast to the embedding dtype), scores
  attention by ``query_pre_attn_scalar^-1/2`` and soft-caps scores (``c·tanh(x/c)``, c = 50) and final
  logits (c = 30); Llama scores by ``head_dim^-1/2`` and has no caps.
- GQA: query head h reads key/value head ``h // (n_heads / n_kv_heads)``.
- Tied models (Gemma) unembed with the embedding matrix; untied ones (Llama) with ``lm_head.weight``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open

from core.errors import WeightFileError
from core.sae_formats import read_json, read_safetensors

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
ARCHITECTURES = {"gemma2", "llama"}


@dataclass(frozen=True)
class ModelGeometry:
    """What the weight-only circuits need to know about a model, read from its config.json."""

    architecture: str
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    tied_embeddings: bool
    rope_theta: float | None
    attn_scale: float  # multiplies q·k
    attn_softcap: float | None
    final_softcap: float | None

    @property
    def norm_offset(self) -> float:
        """Added to RMSNorm weights to get the gain: 1 for Gemma-2's (1 + w), 0 for Llama."""
        return 1.0 if self.architecture == "gemma2" else 0.0

    @property
    def embedding_scale(self) -> float:
        """Input embedding multiplier: sqrt(d_model) for Gemma-2, 1 for Llama."""
        return math.sqrt(self.d_model) if self.architecture == "gemma2" else 1.0

    def kv_head(self, head: int) -> int:
        """GQA: the key/value head read by query head ``head``."""
        return head // (self.n_heads // self.n_kv_heads)

    @classmethod
    def from_config(cls, config: dict, source: Path | str = CONFIG_FILE) -> "ModelGeometry":
        arch = config.get("model_type")
        if arch not in ARCHITECTURES:
            raise WeightFileError(source, f"model_type {arch!r} is not supported ({sorted(ARCHITECTURES)})")
        try:
            n_heads = int(config["num_attention_heads"])
            head_dim = int(config.get("head_dim") or config["hidden_size"] // n_heads)
            n_kv = int(config.get("num_key_value_heads") or n_heads)
            scalar = float(config["query_pre_attn_scalar"]) if arch == "gemma2" else float(head_dim)
            rope = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta")
            geometry = cls(
                architecture=arch,
                d_model=int(config["hidden_size"]),
                n_layers=int(config["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=n_kv,
                head_dim=head_dim,
                vocab_size=int(config["vocab_size"]),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                tied_embeddings=bool(config.get("tie_word_embeddings", arch == "gemma2")),
                rope_theta=float(rope) if rope is not None else None,
                attn_scale=scalar**-0.5,
                attn_softcap=config.get("attn_logit_softcapping") if arch == "gemma2" else None,
                final_softcap=config.get("final_logit_softcapping") if arch == "gemma2" else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightFileError(source, f"missing or malformed config field: {exc!r}") from exc
        if n_heads % n_kv:
            raise WeightFileError(source, f"{n_heads} query heads are not a multiple of {n_kv} kv heads")
        return geometry


@dataclass(frozen=True)
class AttentionWeights:
    """One layer's attention projections (transformers' Linear layout, float32) and the norm gains."""

    q: torch.Tensor  # (n_heads·head_dim, d_model)
    k: torch.Tensor  # (n_kv_heads·head_dim, d_model)
    v: torch.Tensor  # (n_kv_heads·head_dim, d_model)
    o: torch.Tensor  # (d_model, n_heads·head_dim)
    input_gain: torch.Tensor  # (d_model,) gain of the pre-attention RMSNorm
    output_gain: torch.Tensor | None  # (d_model,) Gemma-2's post-attention RMSNorm gain; None for Llama


class ModelCheckpoint:
    """A model snapshot folder (config.json + safetensors) read lazily, tensor by tensor."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.geometry = ModelGeometry.from_config(read_json(self.root / CONFIG_FILE), self.root / CONFIG_FILE)

    @staticmethod
    def needed_tensors(geometry: ModelGeometry) -> list[str]:
        """Names of every tensor the analysis reads: embeddings, unembedding, norms, attention."""
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        if not geometry.tied_embeddings:
            names.append("lm_head.weight")
        for layer in range(geometry.n_layers):
            prefix = f"model.layers.{layer}."
            names += [prefix + f"self_attn.{p}_proj.weight" for p in "qkvo"]
            names.append(prefix + "input_layernorm.weight")
            if geometry.architecture == "gemma2":
                names.append(prefix + "post_attention_layernorm.weight")
        return names

    @cached_property
    def weight_map(self) -> dict[str, str]:
        """Tensor name → shard file, from the index (sharded) or the single file's header."""
        index = self.root / INDEX_FILE
        if index.exists():
            data = read_json(index)
            if not isinstance(data.get("weight_map"), dict):
                raise WeightFileError(index, "has no 'weight_map' object")
            return data["weight_map"]
        single = self.root / SINGLE_FILE
        if not single.exists():
            raise WeightFileError(self.root, f"neither {INDEX_FILE} nor {SINGLE_FILE} is present")
        with safe_open(single, framework="pt") as f:
            return {name: SINGLE_FILE for name in f.keys()}

    def tensor(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """One tensor as float32, checked against ``shape`` and for NaN/Inf."""
        shard = self.weight_map.get(name)
        if shard is None:
            raise WeightFileError(self.root / INDEX_FILE, f"tensor {name!r} is not in the weight map")
        path = self.root / shard
        t = read_safetensors(path, [name])[name]
        if shape is not None and tuple(t.shape) != shape:
            raise WeightFileError(path, f"{name} has shape {tuple(t.shape)}, config.json implies {shape}")
        t = t.to(torch.float32)
        if not bool(torch.isfinite(t).all()):
            raise WeightFileError(path, f"{name} has NaN/Inf values")
        return t

    def embedding(self) -> torch.Tensor:
        """Raw token embedding matrix W_E, (vocab, d_model) — without Gemma's sqrt(d_model) scale."""
        g = self.geometry
        return self.tensor("model.embed_tokens.weight", (g.vocab_size, g.d_model))

    def unembedding(self) -> torch.Tensor:
        """W_U as rows per token, (vocab, d_model): the embedding if tied, else lm_head."""
        g = self.geometry
        if g.tied_embeddings:
            return self.embedding()
        return self.tensor("lm_head.weight", (g.vocab_size, g.d_model))

    def norm_gain(self, name: str) -> torch.Tensor:
        """Effective RMSNorm gain of a norm weight: ``norm_offset + w``."""
        return self.tensor(name, (self.geometry.d_model,)) + self.geometry.norm_offset

    def final_norm_gain(self) -> torch.Tensor:
        return self.norm_gain("model.norm.weight")

    def attention(self, layer: int) -> AttentionWeights:
        """Layer ``layer``'s q/k/v/o projections and its attention-side norm gains."""
        g = self.geometry
        if not 0 <= layer < g.n_layers:
            raise IndexError(f"layer {layer} outside 0..{g.n_layers - 1}")
        p = f"model.layers.{layer}."
        q_dim, kv_dim = g.n_heads * g.head_dim, g.n_kv_heads * g.head_dim
        return AttentionWeights(
            q=self.tensor(p + "self_attn.q_proj.weight", (q_dim, g.d_model)),
            k=self.tensor(p + "self_attn.k_proj.weight", (kv_dim, g.d_model)),
            v=self.tensor(p + "self_attn.v_proj.weight", (kv_dim, g.d_model)),
            o=self.tensor(p + "self_attn.o_proj.weight", (g.d_model, q_dim)),
            input_gain=self.norm_gain(p + "input_layernorm.weight"),
            output_gain=self.norm_gain(p + "post_attention_layernorm.weight") if g.architecture == "gemma2" else None,
        )
