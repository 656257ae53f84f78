"""The per-SAE pipeline stages as plain functions: lenses, circuits, classes (the assets are adapters).

Every stage runs the SAE's features, its control (``core.lens.control``) and isotropic null directions through
the same computation; rows carry ``sample`` = 'feature' | 'control' | 'null'. The null calibrates thresholds
and z-scores; the control is the reference the verdicts compare the features with (``core.analysis.verdicts``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
import torch

from core.analysis.classify import FeatureClasses, classify_features
from core.analysis.profiles import circuit_values, feature_participation, head_write_frame, participation
from core.analysis.semantic import CANDIDATES
from core.analysis.statistics import DEFAULT_QUANTILE
from core.compute.engine import RowStats
from core.lens.circuits import (
    CIRCUIT_SETS,
    PHASES,
    VocabOperands,
    all_circuits,
    circuit_stats,
    input_lens,
    ov_write_norms,
    paired_layers,
)
from core.lens.control import control_sae, matched_null
from core.lens.frames import circuit_frame, summary_frame, topk_frame
from core.lens.output_lens import lens_operand, null_directions, output_lens, top_token_cosine
from core.weights.model_weights import ModelCheckpoint
from core.weights.sae_formats import SaeWeights

SAMPLES = ("feature", "control", "null")  # through every circuit
LENS_SAMPLES = (*SAMPLES, "matched_null")  # through the lenses: the class thresholds' default null too
LENS_SIDES = {"output": "decoder_unembedding", "input": "encoder_embedding"}  # lens -> the directions it reads
CONTROL_HALF = {"encoder_embedding": "encoder", "decoder_unembedding": "decoder"}  # phase -> core.lens.control half


@dataclass(frozen=True)
class EngineSettings:
    """How the engine runs: top-k size, matmul precision and device."""

    k: int = 10
    compute_dtype: torch.dtype = torch.float32
    device: str = "cpu"


def sample_direction(sae: SaeWeights, key: str, n_null: int, phase: str, sample: str) -> torch.Tensor:
    """One sample's unit directions (rows) of one phase, drawn alone: the SAE's encoder / decoder directions
    (``feature``), the control's (``control``, ``core.lens.control``), ``n_null`` isotropic null directions (``null``,
    the same for both phases) or ``n_null`` SAE-matched null directions (``matched_null``,
    ``core.lens.control.matched_null``), all seeded by ``key`` — the same directions whatever else is drawn."""
    if sample == "feature":
        return {"encoder_embedding": sae.encoder_directions, "decoder_unembedding": sae.decoder_directions}[phase]()
    if sample == "control":
        return control_sae(sae, key, halves=(CONTROL_HALF[phase],)).directions[CONTROL_HALF[phase]]
    if sample == "null":
        return null_directions(n_null, sae.d_model, key)
    if sample == "matched_null":
        return matched_null(sae, key, n_null, (phase,))[phase]
    raise ValueError(f"sample {sample!r} is not one of {LENS_SAMPLES}")


def sample_directions(
    sae: SaeWeights, key: str, n_null: int, matched: bool = False, phases: tuple[str, ...] = PHASES
) -> dict[str, dict[str, torch.Tensor]]:
    """Per sample (``SAMPLES``, and ``matched_null`` when ``matched``), per phase of ``phases``, the unit directions
    of ``sample_direction``."""
    samples = LENS_SAMPLES if matched else SAMPLES
    return {s: {phase: sample_direction(sae, key, n_null, phase, s) for phase in phases} for s in samples}


class PhaseDirections:
    """``sample_directions`` one phase at a time: asking for another phase drops the held one before drawing it,
    so a stage holds one phase's directions (features and control: 0.28 GiB at a 16k Gemma-2-2B SAE) in any
    order of phases (a switch back draws them again, the same directions)."""

    def __init__(self, sae: SaeWeights, key: str, n_null: int) -> None:
        self._draw = lambda phase: sample_directions(sae, key, n_null, phases=(phase,))
        self._held: tuple[str, dict[str, torch.Tensor]] | None = None

    def __call__(self, phase: str) -> dict[str, torch.Tensor]:
        """Per sample, the unit directions of ``phase`` (rows)."""
        if self._held is None or self._held[0] != phase:
            self._held = None
            self._held = (phase, {sample: d[phase] for sample, d in self._draw(phase).items()})
        return self._held[1]


def _stacked(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    return pd.concat([f.assign(sample=s) for s, f in frames.items()], ignore_index=True).rename(
        columns={"row": "feature"}
    )


def lens_stage(
    sae: SaeWeights, checkpoint: ModelCheckpoint, tokens: list[str], key: str, n_null: int, settings: EngineSettings
) -> dict[str, pd.DataFrame]:
    """Tables ``output_lens_tokens``, ``output_lens_stats``, ``input_lens_tokens``, ``input_lens_stats``
    (``core.lens.output_lens``, ``core.lens.circuits.input_lens``) for every sample of ``LENS_SAMPLES``: the
    ``CANDIDATES`` best tokens (the semantic tests pick their normal forms, ``core.analysis.semantic``) and
    ``settings.k`` bottom ones; stats incl. ``top_mean`` over the best ``settings.k`` and ``top1_cosine`` (cosine of
    the lens operand with the best token's row: ``core.analysis.classify`` token identity). One lens and one sample at
    a time: only that sample's directions of the lens's phase are held (``sample_direction``)."""
    tables = {}
    for lens, phase in LENS_SIDES.items():
        tables[f"{lens}_lens_tokens"], tables[f"{lens}_lens_stats"] = _lens_side(
            lens, partial(sample_direction, sae, key, n_null, phase), checkpoint, tokens, settings
        )
    return tables


def _lens_side(
    lens: str,
    draw: Callable[[str], torch.Tensor],
    checkpoint: ModelCheckpoint,
    tokens: list[str],
    settings: EngineSettings,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The tokens and stats tables of one lens (``lens_stage``); ``draw(sample)`` gives a sample's directions, asked
    for one sample at a time."""
    compute: Callable[..., RowStats] = output_lens if lens == "output" else input_lens
    operand = {"output": lambda d: lens_operand(d, checkpoint), "input": lambda d: d}[lens]
    matrix = checkpoint.unembedding() if lens == "output" else checkpoint.embedding()
    candidates = min(CANDIDATES, checkpoint.geometry.vocab_size)
    token_rows, summaries = {}, {}
    for sample in LENS_SAMPLES:
        directions = draw(sample)
        stats = compute(
            directions, checkpoint, k=candidates, compute_dtype=settings.compute_dtype, device=settings.device
        )
        token_rows[sample] = topk_frame(stats, tokens, settings.k)
        cosine = top_token_cosine(operand(directions), matrix, stats.top_ids[:, 0])
        summaries[sample] = summary_frame(stats, settings.k).assign(top1_cosine=cosine.numpy())
        del directions, stats  # before the next sample's are drawn
    return _stacked(token_rows), _stacked(summaries)


@dataclass(frozen=True)
class CircuitTables:
    """``circuit_stats`` (engine summaries per direction × circuit; empty when they went to a sink) and
    ``head_writes`` (write norms)."""

    circuit_stats: pd.DataFrame
    head_writes: pd.DataFrame
    n_circuits: int


def circuit_stage(
    sae: SaeWeights,
    checkpoint: ModelCheckpoint,
    key: str,
    sae_layer: int,
    n_null: int,
    settings: EngineSettings,
    scope: str = "adjacent",
    circuit_set: str = "used",
    progress: Callable[[int, int], None] | None = None,
    sink: Callable[[pd.DataFrame], None] | None = None,
) -> CircuitTables:
    """The circuits of ``core.lens.circuits.CIRCUIT_SETS[circuit_set]`` at the layers ``paired_layers(sae_layer, …,
    scope)`` for every sample, and the decoder directions' write norms at the reader layers. With ``sink``,
    each circuit's ``circuit_stats`` rows (all samples) are handed to it as soon as they exist and not kept
    (``TableStore.appender`` streams them to disk), so memory does not grow with the number of circuits."""
    directions = PhaseDirections(sae, key, n_null)
    geometry = checkpoint.geometry
    layers = paired_layers(sae_layer, geometry.n_layers, scope)
    if circuit_set not in CIRCUIT_SETS:
        raise ValueError(f"circuit set {circuit_set!r} is not one of {sorted(CIRCUIT_SETS)}")
    circuits = all_circuits(geometry, layers, CIRCUIT_SETS[circuit_set])
    # each circuit's operand is asked for once per sample
    operands = VocabOperands(checkpoint, device=settings.device, plan=[c for c in circuits for _ in SAMPLES])
    frames: list[pd.DataFrame] = []
    for i, circuit in enumerate(circuits, 1):
        rows = pd.concat(
            [
                circuit_frame(
                    circuit_stats(
                        directions(circuit.phase)[sample],
                        circuit,
                        operands,
                        k=settings.k,
                        compute_dtype=settings.compute_dtype,
                    ),
                    circuit,
                    geometry,
                ).assign(sample=sample)
                for sample in SAMPLES
            ],
            ignore_index=True,
        )
        if sink is None:
            frames.append(rows)
        else:
            sink(rows)
        if progress is not None:
            progress(i, len(circuits))
    writes = [
        head_write_frame(
            {s: ov_write_norms(d, layer, operands).numpy() for s, d in directions("decoder_unembedding").items()}, layer
        )
        for layer in layers["decoder_unembedding"]
    ]
    empty = pd.DataFrame(columns=["sample", "feature", "phase", "kind", "attn_layer", "head", "value"])
    return CircuitTables(
        pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(),
        pd.concat(writes, ignore_index=True) if writes else empty,
        len(circuits),
    )


@dataclass(frozen=True)
class ClassTables:
    """Classes of features, control and null (``classes``), attention participation per head and per
    direction (feature and control samples)."""

    classes: FeatureClasses
    participation: pd.DataFrame
    feature_participation: pd.DataFrame

    def rows(self, sample: str) -> pd.DataFrame:
        rows = self.classes.rows
        return rows[rows["sample"] == sample].drop(columns="sample").reset_index(drop=True)


def class_stage(
    lens: dict[str, pd.DataFrame],
    circuit_stats: pd.DataFrame,
    head_writes: pd.DataFrame,
    normal: np.ndarray,
    embedding: np.ndarray,
    unembedding: np.ndarray,
    quantile: float = DEFAULT_QUANTILE,
    k: int = 10,
) -> ClassTables:
    """Classes (``core.analysis.classify``; ``normal``: per token id, a normal token, ``core.weights.vocab``) and
    participation (``core.analysis.profiles``) from the stored tables of one SAE (circuit tables carrying ``release,
    sae_id, layer``); never reads attention weights."""
    classes = classify_features(lens, normal, unembedding, embedding, quantile, k)
    if len(circuit_stats) or len(head_writes):
        part = participation(circuit_values(circuit_stats, head_writes), quantile)
    else:
        part = participation(
            pd.DataFrame(
                columns=[
                    "release",
                    "sae_id",
                    "layer",
                    "sample",
                    "feature",
                    "phase",
                    "kind",
                    "attn_layer",
                    "head",
                    "value",
                    "topk_mass",
                ]
            ),
            quantile,
        )
    return ClassTables(classes, part, feature_participation(part))
