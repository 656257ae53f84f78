"""Decoder–unembedding ("output") lens: which tokens a feature's decoder direction predicts directly.

For a unit decoder direction d (a row of W_dec / ||W_dec[i]||) the logits it would produce if it were
the whole final residual stream are, exactly as transformers' ``*ForCausalLM`` computes them::

    logits(d) = softcap( W_U · RMSNorm_final(d) ),   RMSNorm_final(d) = d / sqrt(mean(d²) + eps) ⊙ g

with g = 1 + w (Gemma-2/3) or w (Llama), W_U the embedding for tied models and ``lm_head`` otherwise, and
softcap = 30·tanh(x/30) on Gemma-2 (identity on Llama, and on Gemma 3 unless its config sets
``final_logit_softcapping``; verified in ``tests/test_gemma3_fidelity.py``). The norm and gain are folded into the left
operand, so the vocabulary-sized product goes through the streamed engine (``core.compute.engine``) and only
per-feature statistics (top/bottom-k tokens, moments, quantiles, softmax summaries) are kept.

The null reference is the same lens on random unit directions (isotropic Gaussian, normalised), seeded
from the SAE's key so it is reproducible; it calibrates every threshold applied to these statistics.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

from core.compute.engine import RowStats, row_stats
from core.lens.forward import rms_normalize
from core.weights.model_weights import ModelCheckpoint


def output_lens(
    directions: torch.Tensor,
    checkpoint: ModelCheckpoint,
    *,
    k: int = 10,
    compute_dtype: torch.dtype = torch.float32,
    device: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RowStats:
    """Statistics of ``logits(d)`` over the vocabulary for each row ``d`` of ``directions``."""
    g = checkpoint.geometry
    return row_stats(
        lens_operand(directions, checkpoint),
        checkpoint.unembedding(),
        k=k,
        softcap=g.final_softcap,
        compute_dtype=compute_dtype,
        device=device,
        progress=progress,
    )


def lens_operand(directions: torch.Tensor, checkpoint: ModelCheckpoint) -> torch.Tensor:
    """The left operand of the output lens: ``RMSNorm_final(d)`` with the final gain, per row (float32)."""
    g = checkpoint.geometry
    return rms_normalize(directions.to(torch.float32), checkpoint.final_norm_gain(), g.rms_norm_eps)


def top_token_cosine(left: torch.Tensor, matrix: torch.Tensor, ids: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """``cos(left[r], matrix[ids[r]])`` per row r: how much of a lens operand its best token's row explains
    (cos² = the share of its energy along that row); in blocks of ``block`` rows, so the gathered rows and products
    are never the size of ``left``."""
    return torch.cat(
        [_cosines(part, matrix[i].to(torch.float32)) for part, i in zip(left.split(block), ids.split(block))]
    )


def _cosines(left: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    left = left.to(torch.float32)
    norms = (left.norm(dim=1) * rows.norm(dim=1)).clamp_min(torch.finfo(torch.float32).tiny)
    return (left * rows).sum(dim=1) / norms


def null_directions(n: int, d_model: int, key: str) -> torch.Tensor:
    """``n`` random unit directions in R^d_model, seeded by ``key`` (the same key → the same directions)."""
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_model, generator=gen)
    return x / x.norm(dim=1, keepdim=True)
