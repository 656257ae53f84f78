"""The control SAE: random directions with the SAE's own second moments, the reference for every claim.

A null of isotropic random directions (``core.lens.output_lens.null_directions``) calibrates thresholds; it does
not tell which structure belongs to the *features*. Attention structure, anisotropy or hub tokens that live
in the model's weights show up for any direction that shares the SAE's overall geometry. The control asks:
would an SAE of the same width whose directions are random but spread like this SAE's show the same thing?

Construction (per SAE, seeded by its partition key so it is reproducible). With Ê (n, d) and D̂ (n, d) the
unit encoder / decoder directions as rows, the joint second-moment matrix of the concatenated rows is
``M = [Ê D̂]ᵀ [Ê D̂] / n`` (2d × 2d, uncentred, so a common mean direction is kept). Control row j is
``z_j = g_j [Ê D̂] / sqrt(n)`` with ``g_j ~ N(0, I_n)``: a Gaussian vector with second moment exactly M,
drawn without factorising M (no rank condition, one matmul). Its two halves are normalised into a control
encoder and decoder direction, so the encoder–decoder cross-covariance of the SAE is kept too. Control
magnitudes (encoder / decoder norms) are the SAE's own norms in a seeded random order: any magnitude
difference the control shows between its classes is then chance.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from core.weights.sae_formats import SaeWeights

CONTROL_CHUNK = 1024  # control rows drawn per matmul


@dataclass(frozen=True)
class ControlSae:
    """Unit control directions (n, d) and the magnitudes assigned to them (n,)."""

    encoder_directions: torch.Tensor
    decoder_directions: torch.Tensor
    encoder_norm: torch.Tensor
    decoder_norm: torch.Tensor


def seed_of(key: str, purpose: str) -> int:
    """A 63-bit seed from a partition key and a purpose string (sha256; stable across runs and hosts)."""
    return int.from_bytes(hashlib.sha256(f"{purpose}:{key}".encode()).digest()[:8], "little") >> 1


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def control_sae(sae: SaeWeights, key: str, n: int | None = None) -> ControlSae:
    """``n`` (default: the SAE's width) control features of ``sae`` (module doc), seeded by ``key``.
    Raises ``ValueError`` when the SAE has no usable direction (a control cannot be drawn from nothing)."""
    encoder_dirs, decoder_dirs = sae.encoder_directions(), sae.decoder_directions()
    encoder_norm, decoder_norm = sae.encoder_norms, sae.decoder_norms
    width, d = encoder_dirs.shape
    if width == 0 or decoder_dirs.shape != (width, d):
        raise ValueError(
            f"cannot draw a control from encoder {tuple(encoder_dirs.shape)} / decoder "
            f"{tuple(decoder_dirs.shape)} directions"
        )
    rows = torch.cat([encoder_dirs, decoder_dirs], dim=1).to(torch.float32)
    del encoder_dirs, decoder_dirs  # rows holds them: at most two (width, 2d) matrices live from here
    if not torch.isfinite(rows).all():
        raise ValueError("cannot draw a control: the SAE's directions are not all finite")
    n = width if n is None else n
    gen = torch.Generator().manual_seed(seed_of(key, "control"))
    z = _second_moment_draw(rows, n, gen)
    del rows
    order = torch.randint(0, width, (n,), generator=gen) if n != width else torch.randperm(width, generator=gen)
    return ControlSae(_unit(z[:, :d]), _unit(z[:, d:]), encoder_norm[order].float(), decoder_norm[order].float())


def _second_moment_draw(rows: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` Gaussian rows ``g [rows] / sqrt(width)``, ``g ~ N(0, I_width)``: second moment exactly that of ``rows``
    (drawn ``CONTROL_CHUNK`` rows at a time into one (n, columns) result, scaled in place)."""
    out = torch.empty(n, rows.shape[1])
    for start in range(0, n, CONTROL_CHUNK):
        g = torch.randn(min(CONTROL_CHUNK, n - start), rows.shape[0], generator=gen)
        torch.matmul(g, rows, out=out[start : start + len(g)])
    return out.div_(rows.shape[0] ** 0.5)


def matched_null(sae: SaeWeights, key: str, n: int) -> dict[str, torch.Tensor]:
    """The SAE-matched null (``core.analysis.classify``): ``n`` unit directions per phase drawn like the control (module
    doc) but independently of it (its own seed), one draw per phase — ``encoder_embedding`` with the encoder
    directions' second moments, ``decoder_unembedding`` with the decoder's. It calibrates the class thresholds, so
    the control stays an out-of-sample reference."""
    gen = torch.Generator().manual_seed(seed_of(key, "matched_null"))
    return {
        phase: _unit(_second_moment_draw(dirs.to(torch.float32), n, gen))
        for phase, dirs in (
            ("encoder_embedding", sae.encoder_directions()),
            ("decoder_unembedding", sae.decoder_directions()),
        )
    }
