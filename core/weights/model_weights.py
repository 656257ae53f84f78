"""Model geometry from ``config.json`` and lazy reads of only the tensors the analysis needs.

Never instantiates the model: tensors are read by name from (sharded) safetensors through
``model.safetensors.index.json`` (``weight_map``: tensor name → shard file) with ``safe_open``, or from
a single ``model.safetensors``. Tensor names are transformers' own (``model.embed_tokens.weight``,
``model.layers.{l}.self_attn.q_proj.weight``, ...).

Geometry facts (transformers ``modeling_gemma2.py`` / ``modeling_gemma3.py`` / ``modeling_llama.py``):
- RMSNorm: ``x / sqrt(mean(x²) + eps) · g`` with ``g = 1 + w`` for Gemma-2/3 and ``g = w`` for Llama.
- Gemma-2 scales input embeddings by ``sqrt(d_model)`` (cast to the embedding dtype), scores
  attention by ``query_pre_attn_scalar^-1/2`` and soft-caps scores (``c·tanh(x/c)``, c = 50) and final
  logits (c = 30); Llama scores by ``head_dim^-1/2`` and has no caps.
- Gemma 3 (``model_type`` ``gemma3_text``, or ``gemma3`` = the multimodal wrapper whose ``text_config`` holds
  these fields and whose hub checkpoints name the text tensors ``language_model.model.*``): Gemma-2's
  ``1 + w`` norms, ``sqrt(d_model)`` embedding scale, ``query_pre_attn_scalar^-1/2`` score scale, tied
  embeddings and post-attention norm, plus a per-head RMSNorm on queries and keys after q/k_proj and before
  RoPE (``q_norm`` / ``k_norm``, weight (head_dim,), gain ``1 + w``, shared by all heads of a layer).
  No attention softcap: ``Gemma3Attention`` never passes ``attn_logit_softcapping`` to the attention
  function, so a value in config.json is ignored here as there. The final softcap is applied only when
  ``final_logit_softcapping`` is set (null in Gemma 3's configs). Layers are ``sliding_attention`` (window
  ``sliding_window``, local RoPE base) or ``full_attention`` (``layer_types``, else every
  ``sliding_window_pattern``-th layer is full); both only mask / rotate by position, so at position
  distance 0 (how every circuit here is read, see ``core.lens.circuits``) the two kinds are the same map.
  Fields missing from a Gemma 3 config take ``transformers.Gemma3TextConfig``'s defaults (5.24).
- GQA: query head h reads key/value head ``h // (n_heads / n_kv_heads)``.
- Tied models (Gemma) unembed with the embedding matrix; untied ones (Llama) with ``lm_head.weight``.

Memory: a read holds the tensor as float32 and, while it converts a bf16 tensor, the bf16 copy too (1.5× the
float32 size at most); the NaN/Inf check adds a few MiB (``core.weights.sae_formats.nonfinite_count``). While a caller
holds a tensor, asking for it again returns the same object (no second read, no second copy): a tied model's
embedding and unembedding are one tensor. The vocabulary matrices (embedding, unembedding) are kept for the
checkpoint's life, and ``core.weights.discovery.fetch_model`` hands every stage of a process the same checkpoint
(``open_checkpoint``), so stages that run in one process read them once.
"""

from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from core.errors import WeightFileError
from core.weights.sae_formats import nonfinite_count, read_float32, read_json

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
ARCHITECTURES = {"gemma2", "gemma3_text", "gemma3", "llama"}  # supported config.json model_type values
GEMMA_FAMILY = {"gemma2", "gemma3"}  # architectures with (1 + w) norms, sqrt(d_model) embedding scale, post-attn norm
# transformers 5.24 Gemma3TextConfig defaults (configuration_gemma3.py) for fields a Gemma 3 config may omit.
GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "sliding_window_pattern": 6,
    "final_logit_softcapping": None,
}


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
    qk_norm: bool = False  # Gemma 3: per-head RMSNorm of queries and keys (q_norm / k_norm)
    layer_types: tuple[str, ...] | None = None  # Gemma 3: "sliding_attention" / "full_attention" per layer
    sliding_window: int | None = None
    tensor_prefix: str = "model."  # of the decoder's tensors: model.embed_tokens.weight, model.layers.{l}...

    @property
    def norm_offset(self) -> float:
        """Added to RMSNorm weights to get the gain: 1 for Gemma-2/3's (1 + w), 0 for Llama."""
        return 1.0 if self.architecture in GEMMA_FAMILY else 0.0

    @property
    def embedding_scale(self) -> float:
        """Input embedding multiplier: sqrt(d_model) for Gemma-2/3, 1 for Llama."""
        return math.sqrt(self.d_model) if self.architecture in GEMMA_FAMILY else 1.0

    @property
    def post_attention_norm(self) -> bool:
        """Gemma-2/3 normalise the attention output (``post_attention_layernorm``) before the residual add;
        Llama's layer of that name is the MLP's input norm."""
        return self.architecture in GEMMA_FAMILY

    def kv_head(self, head: int) -> int:
        """GQA: the key/value head read by query head ``head``."""
        return head // (self.n_heads // self.n_kv_heads)

    @classmethod
    def from_config(cls, config: dict, source: Path | str = CONFIG_FILE) -> ModelGeometry:
        model_type = config.get("model_type")
        if model_type not in ARCHITECTURES:
            raise WeightFileError(source, f"model_type {model_type!r} is not supported ({sorted(ARCHITECTURES)})")
        arch, prefix = ("gemma3" if model_type.startswith("gemma3") else model_type), "model."
        extra: dict[str, Any] = {}
        try:
            if arch == "gemma3":
                config, prefix, extra = _gemma3_text_config(config)
            n_heads = int(config["num_attention_heads"])
            head_dim = int(config.get("head_dim") or config["hidden_size"] // n_heads)
            n_kv = int(config.get("num_key_value_heads") or n_heads)
            scalar = float(config["query_pre_attn_scalar"]) if arch in GEMMA_FAMILY else float(head_dim)
            rope = config.get("rope_theta") or _rope_theta(config.get("rope_parameters") or {})
            geometry = cls(
                architecture=arch,
                d_model=int(config["hidden_size"]),
                n_layers=int(config["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=n_kv,
                head_dim=head_dim,
                vocab_size=int(config["vocab_size"]),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                tied_embeddings=bool(config.get("tie_word_embeddings", arch in GEMMA_FAMILY)),
                rope_theta=float(rope) if rope is not None else None,
                attn_scale=scalar**-0.5,
                attn_softcap=config.get("attn_logit_softcapping") if arch == "gemma2" else None,
                final_softcap=config.get("final_logit_softcapping") if arch in GEMMA_FAMILY else None,
                tensor_prefix=prefix,
                **extra,
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
    output_gain: torch.Tensor | None  # (d_model,) Gemma-2/3's post-attention RMSNorm gain; None for Llama
    q_norm_gain: torch.Tensor | None = None  # (head_dim,) Gemma 3's per-head query RMSNorm gain (1 + w)
    k_norm_gain: torch.Tensor | None = None  # (head_dim,) Gemma 3's per-head key RMSNorm gain (1 + w)

    def to(self, device: torch.device | str) -> AttentionWeights:
        """The same weights on ``device`` (absent gains stay None)."""
        moved: dict[str, Any] = {
            f.name: None if (t := getattr(self, f.name)) is None else t.to(device) for f in fields(self)
        }
        return AttentionWeights(**moved)


class ModelCheckpoint:
    """A model snapshot folder (config.json + safetensors) read lazily, tensor by tensor."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.geometry = ModelGeometry.from_config(read_json(self.root / CONFIG_FILE), self.root / CONFIG_FILE)
        self._held: weakref.WeakValueDictionary[str, torch.Tensor] = weakref.WeakValueDictionary()
        self._kept: dict[str, torch.Tensor] = {}  # the vocabulary matrices: read once per checkpoint

    @staticmethod
    def needed_tensors(geometry: ModelGeometry) -> list[str]:
        """Names of every tensor the analysis reads: embeddings, unembedding, norms, attention."""
        top = geometry.tensor_prefix
        names = [top + "embed_tokens.weight", top + "norm.weight"]
        if not geometry.tied_embeddings:
            names.append("lm_head.weight")
        for layer in range(geometry.n_layers):
            prefix = f"{top}layers.{layer}."
            names += [prefix + f"self_attn.{p}_proj.weight" for p in "qkvo"]
            names.append(prefix + "input_layernorm.weight")
            if geometry.post_attention_norm:
                names.append(prefix + "post_attention_layernorm.weight")
            if geometry.qk_norm:
                names += [prefix + "self_attn.q_norm.weight", prefix + "self_attn.k_norm.weight"]
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

    def needed_shards(self) -> list[str]:
        """The weight files (sorted) holding ``needed_tensors``: the shards ``core.weights.discovery.fetch_model``
        downloads — a shard holding only other tensors (MLP weights) is neither needed nor present offline."""
        weight_map, needed = self.weight_map, self.needed_tensors(self.geometry)
        missing = [n for n in needed if n not in weight_map]
        if missing:
            source = self.root / (INDEX_FILE if (self.root / INDEX_FILE).exists() else SINGLE_FILE)
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise WeightFileError(source, f"weight map lacks tensors the analysis needs: {shown}")
        return sorted({weight_map[n] for n in needed})

    def tensor(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """One tensor as float32, checked against ``shape`` and for NaN/Inf; the very object returned before
        while a caller still holds it (module docstring: memory), so callers must not modify it in place."""
        shard = self.weight_map.get(name)
        if shard is None:
            raise WeightFileError(self.root / INDEX_FILE, f"tensor {name!r} is not in the weight map")
        path = self.root / shard
        held = self._held.get(name)
        t = held if held is not None else read_float32(path, name)
        if shape is not None and tuple(t.shape) != shape:
            raise WeightFileError(path, f"{name} has shape {tuple(t.shape)}, config.json implies {shape}")
        if held is None:
            t = self._held.setdefault(name, _checked_float32(path, name, t))
        return t

    def embedding(self) -> torch.Tensor:
        """Raw token embedding matrix W_E, (vocab, d_model) — without Gemma's sqrt(d_model) scale."""
        g = self.geometry
        return self._kept_tensor(g.tensor_prefix + "embed_tokens.weight", (g.vocab_size, g.d_model))

    def unembedding(self) -> torch.Tensor:
        """W_U as rows per token, (vocab, d_model): the embedding if tied, else lm_head."""
        g = self.geometry
        if g.tied_embeddings:
            return self.embedding()
        return self._kept_tensor("lm_head.weight", (g.vocab_size, g.d_model))

    def _kept_tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self._kept:
            self._kept[name] = self.tensor(name, shape)
        return self._kept[name]

    def norm_gain(self, name: str, dim: int | None = None) -> torch.Tensor:
        """Effective RMSNorm gain of a norm weight of size ``dim`` (default d_model): ``norm_offset + w``."""
        return self.tensor(name, (dim or self.geometry.d_model,)) + self.geometry.norm_offset

    def final_norm_gain(self) -> torch.Tensor:
        return self.norm_gain(self.geometry.tensor_prefix + "norm.weight")

    def attention(self, layer: int) -> AttentionWeights:
        """Layer ``layer``'s q/k/v/o projections and its attention-side norm gains."""
        g = self.geometry
        if not 0 <= layer < g.n_layers:
            raise IndexError(f"layer {layer} outside 0..{g.n_layers - 1}")
        p = f"{g.tensor_prefix}layers.{layer}."
        q_dim, kv_dim = g.n_heads * g.head_dim, g.n_kv_heads * g.head_dim
        return AttentionWeights(
            q=self.tensor(p + "self_attn.q_proj.weight", (q_dim, g.d_model)),
            k=self.tensor(p + "self_attn.k_proj.weight", (kv_dim, g.d_model)),
            v=self.tensor(p + "self_attn.v_proj.weight", (kv_dim, g.d_model)),
            o=self.tensor(p + "self_attn.o_proj.weight", (g.d_model, q_dim)),
            input_gain=self.norm_gain(p + "input_layernorm.weight"),
            output_gain=self.norm_gain(p + "post_attention_layernorm.weight") if g.post_attention_norm else None,
            q_norm_gain=self.norm_gain(p + "self_attn.q_norm.weight", g.head_dim) if g.qk_norm else None,
            k_norm_gain=self.norm_gain(p + "self_attn.k_norm.weight", g.head_dim) if g.qk_norm else None,
        )


def _folder_state(root: Path) -> tuple[tuple[str, int, int], ...]:
    """(name, size, mtime in ns) of every file in ``root``, following the hub cache's symlinks to the blobs."""
    return tuple((p.name, (s := p.stat()).st_size, s.st_mtime_ns) for p in sorted(root.iterdir()) if p.is_file())


@functools.lru_cache(maxsize=1)
def _checkpoint(root: Path, state: tuple[tuple[str, int, int], ...]) -> ModelCheckpoint:
    return ModelCheckpoint(root)


def open_checkpoint(root: Path) -> ModelCheckpoint:
    """The process's checkpoint of the model folder ``root``: the same object while the folder's files are
    unchanged (a new revision is a new folder; a rewritten file, a new state), so its kept vocabulary
    matrices are read once for every stage run in this process — all of a partition's steps under the CLI
    and ``dagster.materialize`` (in-process executor). Only the latest model is kept (one model's matrices
    in memory). Under the multiprocess, Celery or k8s executors each step is its own process and reads them
    once per step."""
    root = Path(root).resolve()
    return _checkpoint(root, _folder_state(root))


def _checked_float32(path: Path, name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` as float32 (``t`` itself if it is float32), refused if any value is NaN/Inf — checked after the
    cast, so a float64 value beyond float32's range (→ inf) is caught too."""
    t = t.to(torch.float32)
    bad = nonfinite_count(t)
    if bad:
        raise WeightFileError(path, f"{name} has {bad} NaN/Inf values")
    return t


def _rope_theta(rope_parameters: dict) -> float | None:
    """RoPE base from transformers 5's ``rope_parameters``: flat, or per layer type (Gemma 3: the global
    ``full_attention`` base; sliding layers use ``rope_local_base_freq``)."""
    flat = rope_parameters.get("rope_theta")
    return flat if flat is not None else (rope_parameters.get("full_attention") or {}).get("rope_theta")


def _gemma3_text_config(config: dict) -> tuple[dict, str, dict]:
    """(text config with Gemma3TextConfig's defaults filled in, tensor prefix, Gemma-3-only geometry fields).

    ``model_type: gemma3`` (Gemma3ForConditionalGeneration, e.g. google/gemma-3-4b-pt) keeps the text model's
    fields in ``text_config`` and, on the hub, its tensors under ``language_model.model.``; ``gemma3_text``
    (Gemma3ForCausalLM, e.g. google/gemma-3-1b-pt) is flat with ``model.`` tensors. Tied embeddings come from
    the top level when it says so (the wrapper ties ``lm_head`` to the text embedding).
    """
    if config["model_type"] == "gemma3":
        text = {**GEMMA3_TEXT_DEFAULTS, **(config.get("text_config") or {})}
        if "tie_word_embeddings" in config:
            text["tie_word_embeddings"] = config["tie_word_embeddings"]
        prefix = "language_model.model."
    else:
        text, prefix = {**GEMMA3_TEXT_DEFAULTS, **config}, "model."
    n_layers, pattern = int(text["num_hidden_layers"]), int(text.get("sliding_window_pattern") or 6)
    layer_types = text.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)
    ]
    if len(layer_types) != n_layers:
        raise ValueError(f"layer_types has {len(layer_types)} entries for {n_layers} layers")
    window = text.get("sliding_window")
    extra = {"qk_norm": True, "layer_types": tuple(layer_types), "sliding_window": int(window) if window else None}
    return text, prefix, extra
