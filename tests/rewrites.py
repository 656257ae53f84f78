"""Function-preserving weight rewrites (reference.md, "Trap (identifiability)"), on transformers' own models.

Each rewrite takes a transformers causal LM (``AutoModelForCausalLM.from_pretrained(snapshot_dir)``) and returns a
rewritten deep copy (the copy's state-dict tensors edited in place) whose logits equal the original's. A score read
from the weights that changes under one of them is not a property of the model's function.

* ``gemma_o_proj_scale(model, {layer: c})``: ``o_proj`` of layer l times c_l. Gemma-2/3 only: the
  ``post_attention_layernorm`` (an RMSNorm) divides the scale out before the residual add. (Llama's layer of that
  name is the MLP's input norm: there the rewrite is not function-preserving, so it raises.)
* ``llama_residual_scale(model, c)``: ``embed_tokens``, every ``o_proj`` and every ``down_proj`` times c, so the
  whole residual stream is c times larger; every RMSNorm reading it (input, post-attention = pre-MLP, final)
  divides c out. ``lm_head`` is untouched (raises on tied embeddings, where it would scale the logits).
* ``norm_gain_move(model, layer, c)``: layer l's ``input_layernorm`` gain times c, that layer's q/k/v_proj divided
  by c (the input norm feeds only q/k/v). Gemma's gain is ``1 + w``: ``w' = (1 + w) c - 1``; Llama's is w:
  ``w' = w c``.
* ``qk_head_scale(model, layer, kv_head, c)``: the W_Q rows of every query head reading kv head k times c, the W_K
  rows of kv head k divided by c (GQA: query head h reads kv head ``h // (n_heads / n_kv_heads)``). The bilinear
  form ``W_Q,h^T W_K,k`` is unchanged; the separate norms of W_Q and W_K are not. Gemma 3: the per-head
  ``q_norm`` / ``k_norm`` RMSNorms after the projections divide each scale out on its own, so there the rewrite is
  function-preserving for a second reason (and would stay so even with W_Q and W_K scaled independently); it only
  changes the pre-norm projection rows.
* ``vo_head_scale(model, layer, kv_head, c)``: the W_V rows of kv head k times c, the ``o_proj`` COLUMNS of every
  query head of that group divided by c (``W_O,h W_V,k`` unchanged).

Exactness (scales are powers of two, so scaling a float32/bfloat16 number, and every product and sum built from
scaled numbers, is exact barring under/overflow):

* exact in the stored dtype (logits bit-identical): ``qk_head_scale`` on Gemma-2 and Llama, ``vo_head_scale`` on
  all three (the scale passes through matmuls, RoPE, the softmax inputs and the attention-weighted sum
  untouched); ``norm_gain_move`` on Llama (w c and W / c are exact, and Llama's RMSNorm multiplies the bf16-cast
  normalised input by the bf16 gain) and on Gemma-2 with c = 2 (``(1 + w) 2 - 1`` and ``1 + w'`` are exact in
  float32 whenever ``1 + w >= 0.25``, by Sterbenz's lemma or a shared binade; the planted gains lie in
  [0.4, 1.6]; other c need not be exact).
* agree to a tolerance, because a scale is moved THROUGH an RMSNorm, ``x / sqrt(mean(x^2) + eps)`` with eps > 0
  (1e-6 Gemma, 1e-5 Llama), which is not exactly scale-invariant: ``gemma_o_proj_scale`` (post-attention norm),
  ``llama_residual_scale`` (every norm; in bfloat16 the ~1e-4 relative eps effect flips bf16 roundings of the
  residual stream, so most logits move by 1-2 bf16 ulps), ``qk_head_scale`` on Gemma 3 (q_norm / k_norm) and
  ``norm_gain_move`` on Gemma 3 (the q/k ``1/c`` passes through q_norm / k_norm; c = 0.5 there, whose
  ``(1 + w) c - 1`` is rounded in float32 too). With every norm's eps set to 0 these are bit-identical as well
  (checked in ``tests/test_rewrites.py``; Gemma 3's norm_gain_move apart, whose gain is rounded): eps is the
  only source of the difference. ``EXACT`` lists the exact
  (release, rewrite) pairs; ``tests/test_rewrites.py`` states and checks the tolerances of the others.

``write_rewritten_release`` copies a hub cache and commits a rewritten model into the copy, so the pipeline can
be run on a function-identical release whose weights differ.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from core.registry import get_release
from core.testbeds.planted import saved_files
from core.weights.hub_cache import read_tree, repo_cache_dir, write_snapshot

__all__ = [
    "EXACT",
    "REWRITES",
    "gemma_o_proj_scale",
    "llama_residual_scale",
    "load_release_model",
    "norm_gain_move",
    "qk_head_scale",
    "snapshot_dir",
    "vo_head_scale",
    "write_rewritten_release",
]

Rewrite = Callable[[Any], Any]
INDEX_FILE = "model.safetensors.index.json"


def _is_gemma(model: Any) -> bool:
    """Gemma-2/3: ``(1 + w)`` RMSNorm gains and a post-attention norm before the residual add."""
    return model.config.model_type in ("gemma2", "gemma3", "gemma3_text")


def _heads(model: Any) -> tuple[int, int, int]:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_attention_heads, c.num_key_value_heads, head_dim


def _edit(model: Any, edits: dict[str, Callable[[torch.Tensor], None]]) -> Any:
    """A deep copy of ``model`` with each named state-dict tensor edited in place by its function."""
    new = copy.deepcopy(model)
    state = new.state_dict()  # detached tensors sharing the parameters' storage
    missing = sorted(set(edits) - set(state))
    if missing:
        raise KeyError(f"not in the model's state dict: {missing}")
    with torch.no_grad():
        for name, edit in edits.items():
            edit(state[name])
    return new


def _mul(c: float) -> Callable[[torch.Tensor], None]:
    return lambda t: t.mul_(c)


def _layer(model: Any, layer: int) -> str:
    n = model.config.num_hidden_layers
    if not 0 <= layer < n:
        raise ValueError(f"layer {layer} not in 0..{n - 1}")
    return f"model.layers.{layer}."


def _group(model: Any, kv_head: int) -> tuple[range, int]:
    """(query heads reading ``kv_head``, head_dim)."""
    n_heads, n_kv, head_dim = _heads(model)
    if not 0 <= kv_head < n_kv:
        raise ValueError(f"kv head {kv_head} not in 0..{n_kv - 1}")
    per_kv = n_heads // n_kv
    return range(kv_head * per_kv, (kv_head + 1) * per_kv), head_dim


def gemma_o_proj_scale(model: Any, scales: dict[int, float]) -> Any:
    """Layer l's ``self_attn.o_proj.weight`` times ``scales[l]`` (Gemma-2/3: post_attention_layernorm divides it
    out; agrees to a tolerance through that norm's eps)."""
    if not _is_gemma(model):
        raise ValueError(
            f"o_proj scale is function-preserving only with Gemma's post-attention norm, "
            f"not {model.config.model_type!r}"
        )
    return _edit(model, {_layer(model, layer) + "self_attn.o_proj.weight": _mul(c) for layer, c in scales.items()})


def llama_residual_scale(model: Any, c: float) -> Any:
    """``embed_tokens``, every ``o_proj`` and ``down_proj`` times c (Llama: every RMSNorm divides it out; agrees
    to a tolerance through the norms' eps). ``lm_head`` untouched."""
    if _is_gemma(model):
        raise ValueError(
            "Gemma's post-attention / post-feedforward norms re-scale the block outputs: "
            "a global residual scale is not function-preserving there"
        )
    if model.config.tie_word_embeddings:
        raise ValueError("tied embeddings: scaling embed_tokens would scale lm_head and the logits")
    edits = {"model.embed_tokens.weight": _mul(c)}
    for layer in range(model.config.num_hidden_layers):
        pre = _layer(model, layer)
        edits[pre + "self_attn.o_proj.weight"] = _mul(c)
        edits[pre + "mlp.down_proj.weight"] = _mul(c)
    return _edit(model, edits)


def norm_gain_move(model: Any, layer: int, c: float) -> Any:
    """Layer ``layer``'s input_layernorm gain times c, its q/k/v_proj weights divided by c.

    Gemma's gain is ``1 + w``: ``w' = (1 + w) c - 1`` (float32 rounding: a tolerance); Llama's is w: ``w' = w c``
    (exact in bfloat16 for a power-of-two c)."""
    pre = _layer(model, layer)
    if _is_gemma(model):

        def gain(t: torch.Tensor) -> None:
            t.copy_((1.0 + t) * c - 1.0)
    else:
        gain = _mul(c)
    edits = {pre + "input_layernorm.weight": gain}
    edits.update({pre + f"self_attn.{p}_proj.weight": _mul(1.0 / c) for p in "qkv"})
    return _edit(model, edits)


def qk_head_scale(model: Any, layer: int, kv_head: int, c: float) -> Any:
    """W_Q rows of every query head reading kv head ``kv_head`` times c, that kv head's W_K rows divided by c.

    Exact on Gemma-2 / Llama; on Gemma 3 q_norm / k_norm divide each scale out (to their eps)."""
    pre = _layer(model, layer) + "self_attn."
    heads, hd = _group(model, kv_head)

    def q(t: torch.Tensor) -> None:
        t[heads.start * hd : heads.stop * hd].mul_(c)

    def k(t: torch.Tensor) -> None:
        t[kv_head * hd : (kv_head + 1) * hd].mul_(1.0 / c)

    return _edit(model, {pre + "q_proj.weight": q, pre + "k_proj.weight": k})


def vo_head_scale(model: Any, layer: int, kv_head: int, c: float) -> Any:
    """W_V rows of kv head ``kv_head`` times c, the o_proj columns of every query head of its group divided by c
    (exact)."""
    pre = _layer(model, layer) + "self_attn."
    heads, hd = _group(model, kv_head)

    def v(t: torch.Tensor) -> None:
        t[kv_head * hd : (kv_head + 1) * hd].mul_(c)

    def o(t: torch.Tensor) -> None:
        t[:, heads.start * hd : heads.stop * hd].mul_(1.0 / c)

    return _edit(model, {pre + "v_proj.weight": v, pre + "o_proj.weight": o})


def _cycle_scales(model: Any) -> dict[int, float]:
    """A different power-of-two scale per layer: 2, 0.5, 4, 0.25, 2, ..."""
    return {layer: (2.0, 0.5, 4.0, 0.25)[layer % 4] for layer in range(model.config.num_hidden_layers)}


# Per planted release, the named rewrites that apply to it (all planted models have one kv head: kv_head 0).
REWRITES: dict[str, dict[str, Rewrite]] = {
    "planted-gemma": {
        "o_proj_scale": lambda m: gemma_o_proj_scale(m, _cycle_scales(m)),
        "norm_gain_move": lambda m: norm_gain_move(m, 2, 2.0),
        "qk_head_scale": lambda m: qk_head_scale(m, 1, 0, 4.0),
        "vo_head_scale": lambda m: vo_head_scale(m, 3, 0, 0.25),
    },
    "planted-llama": {
        "residual_scale": lambda m: llama_residual_scale(m, 4.0),
        "norm_gain_move": lambda m: norm_gain_move(m, 3, 4.0),
        "qk_head_scale": lambda m: qk_head_scale(m, 2, 0, 0.5),
        "vo_head_scale": lambda m: vo_head_scale(m, 5, 0, 4.0),
    },
    "planted-gemma3": {
        "o_proj_scale": lambda m: gemma_o_proj_scale(m, _cycle_scales(m)),
        "norm_gain_move": lambda m: norm_gain_move(m, 1, 0.5),
        "qk_head_scale": lambda m: qk_head_scale(m, 2, 0, 4.0),
        "vo_head_scale": lambda m: vo_head_scale(m, 0, 0, 2.0),
    },
}

# (release, rewrite) pairs whose logits are bit-identical in the stored dtype (see the module docstring).
EXACT: frozenset[tuple[str, str]] = frozenset(
    {
        ("planted-gemma", "norm_gain_move"),
        ("planted-gemma", "qk_head_scale"),
        ("planted-gemma", "vo_head_scale"),
        ("planted-llama", "norm_gain_move"),
        ("planted-llama", "qk_head_scale"),
        ("planted-llama", "vo_head_scale"),
        ("planted-gemma3", "vo_head_scale"),
    }
)


def snapshot_dir(cache: Path, repo_id: str, revision: str = "main") -> Path:
    """``<cache>/models--org--name/snapshots/<commit>`` of a cached revision (branch or commit sha)."""
    repo = repo_cache_dir(cache, repo_id)
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snap = repo / "snapshots" / commit
    if not snap.is_dir():
        raise FileNotFoundError(f"{repo_id}@{revision} is not in the hub cache {cache}")
    return snap


def load_release_model(cache: Path, release_id: str, **kwargs: Any) -> Any:
    """The release's model from the hub cache ``cache``, offline, in its stored dtype."""
    from transformers import AutoModelForCausalLM

    repo = get_release(release_id).model_repo
    return AutoModelForCausalLM.from_pretrained(repo, cache_dir=cache, local_files_only=True, dtype="auto", **kwargs)


def _shard_contents(index: dict[str, Any], model: Any) -> list[int]:
    """Bytes of tensor data per shard of the original layout (the sizes save_pretrained's sharding sums)."""
    state = model.state_dict()
    sizes: dict[str, int] = {}
    for name, shard in index["weight_map"].items():
        t = state[name]
        sizes[shard] = sizes.get(shard, 0) + t.numel() * t.element_size()
    return sorted(set(sizes.values()))


def _save_like(model: Any, old_index: dict[str, Any], out: Path) -> None:
    """``save_pretrained`` into ``out`` with a ``max_shard_size`` giving the original shard FILES (same names, so
    the overlay commit keeps no stale shard): first the planted generator's d_model * vocab * itemsize // 3, then
    each original shard's content size. Which tensor lands in which shard may differ from the original (the
    loaded model's state-dict order is not the generator's); the new index says where each one is."""
    c = model.config
    want = set(old_index["weight_map"].values())
    candidates = [max(1, c.hidden_size * c.vocab_size * model.dtype.itemsize // 3), *_shard_contents(old_index, model)]
    for size in candidates:
        if out.exists():
            shutil.rmtree(out)
        model.save_pretrained(out, max_shard_size=size)
        index = out / INDEX_FILE
        if index.is_file() and set(json.loads(index.read_text())["weight_map"].values()) == want:
            return
    raise RuntimeError(f"no max_shard_size among {candidates} gives the original shard files {sorted(want)}")


def write_rewritten_release(src_cache: Path, dst_cache: Path, release_id: str, rewrite: Rewrite) -> Path:
    """Copy the hub cache ``src_cache`` to ``dst_cache`` and commit ``rewrite(model)`` there as the newest
    revision of the release's model repo (``refs/main``; parent = the old main, which stays in the cache).

    The model is read from ``src_cache`` offline, rewritten and saved in its stored dtype into the original shard
    files (same names and number, >= 2; the new index maps each tensor); config / generation config are
    re-saved, the tokenizer files copied over from the old snapshot. The SAE repo and every other repo are
    copied unchanged. Returns ``dst_cache``.
    """
    src_cache, dst_cache = Path(src_cache), Path(dst_cache)
    repo_id = get_release(release_id).model_repo
    old_snap = snapshot_dir(src_cache, repo_id)
    old_index = json.loads((old_snap / INDEX_FILE).read_text())
    model = load_release_model(src_cache, release_id)
    dtype = model.dtype
    new = rewrite(model)
    if new.dtype != dtype:
        raise TypeError(f"the rewrite changed the dtype {dtype} -> {new.dtype}")
    shutil.copytree(src_cache, dst_cache, symlinks=True)
    old_tree = read_tree(dst_cache, repo_id)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model"
        _save_like(new, old_index, out)
        files: dict[str, bytes | Path] = dict(saved_files(out))  # the generators' transformers_version stamp
    for path in old_tree:
        if path not in files and path.startswith("tokenizer"):
            files[path] = (old_snap / path).read_bytes()
    stale = sorted(set(old_tree) - set(files))
    if stale:
        raise RuntimeError(f"the old revision's files {stale} would stay in the rewritten one")
    write_snapshot(dst_cache, repo_id, files)
    return dst_cache
