"""Elementwise pieces of the models' forward pass that weight-only circuits fold in.

Both follow transformers' ``modeling_gemma2.py`` / ``modeling_gemma3.py`` / ``modeling_llama.py`` and are checked
against those modules in ``tests/test_fidelity.py`` and ``tests/test_gemma3_fidelity.py`` (``rms_normalize`` is also
Gemma 3's per-head q/k norm, applied over head_dim).
"""

from __future__ import annotations

import torch


def rms_normalize(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: ``x / sqrt(mean(x²) + eps) · gain`` (gain already includes Gemma's +1); the gain is
    applied in place, so the result is the only x-sized tensor made besides ``x²``."""
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).mul_(gain)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma-2's logit soft-capping ``cap · tanh(x / cap)``; identity when ``cap`` is None."""
    return x if cap is None else torch.tanh(x / cap) * cap
