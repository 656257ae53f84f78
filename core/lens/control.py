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
encoder and decoder direction, so the encoder–decoder cross-covariance of the SAE is kept too. The halves
``g Ê`` and ``g D̂`` are computed one at a time from the same Gaussian numbers (the generator restarted from its
seed), so a stage can ask for one half and get exactly what both together would give. Control magnitudes
(encoder / decoder norms) are the SAE's own norms in a random order from a stream of their own: any magnitude
difference the control shows between its classes is then chance.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from core.weights.sae_formats import SaeWeights, nonfinite_count

CONTROL_CHUNK = 1024  # control rows drawn per matmul


HALVES = ("encoder", "decoder")


@dataclass(frozen=True)
class ControlSae:
    """Unit control directions (n, d) of the halves drawn (``"encoder"``, ``"decoder"``), and the magnitudes
    assigned to them (n,)."""

    directions: dict[str, torch.Tensor]
    encoder_norm: torch.Tensor
    decoder_norm: torch.Tensor

    @property
    def encoder_directions(self) -> torch.Tensor:
        return self.directions["encoder"]

    @property
    def decoder_directions(self) -> torch.Tensor:
        return self.directions["decoder"]


def seed_of(key: str, purpose: str) -> int:
    """A 63-bit seed from a partition key and a purpose string (sha256; stable across runs and hosts)."""
    return int.from_bytes(hashlib.sha256(f"{purpose}:{key}".encode()).digest()[:8], "little") >> 1


def _unit_(x: torch.Tensor) -> torch.Tensor:
    """``x``'s rows scaled to unit norm, in place."""
    return x.div_(x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny))


def control_sae(sae: SaeWeights, key: str, n: int | None = None, halves: tuple[str, ...] = HALVES) -> ControlSae:
    """``n`` (default: the SAE's width) control features of ``sae`` (module doc), seeded by ``key``: the directions
    of ``halves`` (each the same whichever others are asked for; none: only the norms) and both norms. At most
    the SAE's directions of one half and its draw live at once. Raises ``ValueError`` when the SAE has no usable
    direction (a control cannot be drawn from nothing)."""
    width, d = sae.d_sae, sae.d_model
    if width == 0 or sae.W_dec.shape != (width, d):
        raise ValueError(
            f"cannot draw a control from encoder {tuple(sae.W_enc.shape)} / decoder {tuple(sae.W_dec.shape)} weights"
        )
    own = {"encoder": sae.encoder_directions, "decoder": sae.decoder_directions}
    n = width if n is None else n
    directions = {}
    for half in halves:
        rows = own[half]().to(torch.float32)
        if nonfinite_count(rows):
            raise ValueError(f"cannot draw a control: the SAE's {half} directions are not all finite")
        gen = torch.Generator().manual_seed(seed_of(key, "control"))
        z = _second_moment_draw(rows, n, gen)
        del rows
        directions[half] = _unit_(z)
    gen = torch.Generator().manual_seed(seed_of(key, "control_norms"))
    order = torch.randint(0, width, (n,), generator=gen) if n != width else torch.randperm(width, generator=gen)
    return ControlSae(directions, sae.encoder_norms[order].float(), sae.decoder_norms[order].float())


def _second_moment_draw(rows: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` Gaussian rows ``g [rows] / sqrt(width)``, ``g ~ N(0, I_width)``: second moment exactly that of ``rows``
    (drawn ``CONTROL_CHUNK`` rows at a time into one (n, columns) result, scaled in place)."""
    out = torch.empty(n, rows.shape[1])
    for start in range(0, n, CONTROL_CHUNK):
        g = torch.randn(min(CONTROL_CHUNK, n - start), rows.shape[0], generator=gen)
        torch.matmul(g, rows, out=out[start : start + len(g)])
    return out.div_(rows.shape[0] ** 0.5)


def matched_null(
    sae: SaeWeights, key: str, n: int, phases: tuple[str, ...] = ("encoder_embedding", "decoder_unembedding")
) -> dict[str, torch.Tensor]:
    """The SAE-matched null (``core.analysis.classify``): ``n`` unit directions per phase of ``phases`` drawn like the
    control (module doc) but independently of it and of each other (a seed per phase) — ``encoder_embedding`` with
    the encoder directions' second moments, ``decoder_unembedding`` with the decoder's. It calibrates the class
    thresholds, so the control stays an out-of-sample reference."""
    own = {"encoder_embedding": sae.encoder_directions, "decoder_unembedding": sae.decoder_directions}
    return {
        phase: _unit_(
            _second_moment_draw(
                own[phase]().to(torch.float32), n, torch.Generator().manual_seed(seed_of(key, f"matched_null:{phase}"))
            )
        )
        for phase in phases
    }
