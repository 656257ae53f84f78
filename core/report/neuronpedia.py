"""Neuronpedia / SAEDashboard "top logits": each feature's top and bottom tokens in exactly the convention of
SAEDashboard's Neuronpedia runner (sae-dashboard 0.8.0, jbloomAus/SAEDashboard tag v0.8.0, commit 37bb168f), written
as a Neuronpedia batch file so the numbers can be compared with, or uploaded beside, Neuronpedia's.

Formula, for feature i and token t (W_U as TransformerLens holds it, (d_model, vocab))::

    logit[i, t] = d_i · U[:, t]                     d_i = W_dec[i] / ||W_dec[i]||
    U = g ⊙ W_U − mean_t'(g ⊙ W_U)[:, t']           models without a final logit softcap (Llama, Gemma 3)
    U = g ⊙ W_U                                     models with one (Gemma-2: final_logit_softcapping = 30)

g is the final RMSNorm gain (``1 + w`` for Gemma, ``w`` for Llama), multiplied into each d_model row of W_U; the
mean is over the vocabulary, per d_model row. No softcap and no bias enter the values. Per feature the
``DASHBOARD_K`` = 10 largest and smallest logits over the whole vocabulary, rounded with ``np.round(·, 3)``; token
strings are the tokenizer's vocabulary keys (``Ġthe``, ``▁the``: pieces, not ``decode([id])``) with
``HTML_ANOMALIES`` replaced, and ``OUT_OF_RANGE_TOKEN`` for embedding rows no key maps to.

Sources (sae-dashboard 0.8.0 unless named):

- ``sae_dashboard/neuronpedia/neuronpedia_runner.py``: ``self.sae.fold_W_dec_norm()`` (SAELens: rows divided by
  their norms); ``HookedSAETransformer.from_pretrained(model_id, **model_from_pretrained_kwargs, dtype)`` — the SAE's
  kwargs are empty for the Gemma Scope and Llama Scope residual SAEs (SAELens ``loading/pretrained_sae_loaders.py``),
  the dtype float32 unless set; ``HTML_ANOMALIES`` and ``get_vocab_dict`` (``tokenizer.vocab`` keys, replacements,
  ``<|outofrange|>`` up to ``d_vocab``); the layout's ``LogitsTableConfig()``, whose ``n_rows`` is 10
  (``components_config.py``).
- ``sae_dashboard/sae_vis_runner.py``: ``logits = feature_resid_dir @ model.W_U``; ``feature_resid_dir`` is the
  decoder row for residual-stream hooks (``transformer_lens_wrapper.to_resid_direction``).
- ``sae_dashboard/data_parsing_fns.py`` ``get_logits_table_data``: top and bottom ``n_rows`` of that vector.
- ``sae_dashboard/neuronpedia/neuronpedia_converter.py``: ``round_list`` (``np.round(x, 3)``), ``to_str_tokens_safe``,
  ``_create_batch_data``; ``neuronpedia_dashboard.py``: ``NeuronpediaDashboardBatch.to_dict``.
- TransformerLens v2.18.0 (sae-dashboard 0.8.0 pins ``transformer-lens ^2.2``), ``HookedTransformer.py``:
  ``from_pretrained`` defaults ``fold_ln=True, center_unembed=True`` and sets ``center_unembed = False`` when
  ``cfg.output_logits_soft_cap > 0``; ``load_and_process_state_dict`` folds RMS norms with
  ``fold_layer_norm(fold_biases=False, center_weights=False)`` (``W_U * ln_final.w[:, None]``), then
  ``center_unembed`` (``W_U - W_U.mean(-1, keepdim=True)``). ``pretrained/weight_conversions/gemma.py``:
  ``ln_final.w = norm.weight + 1``; ``llama.py``: ``ln_final.w = norm.weight``; ``loading_from_pretrained.py``:
  ``output_logits_soft_cap`` 30 for Gemma-2, unset (-1) for Gemma 3.

Not this convention: SAEDashboard's main branch after 0.8.0 (commit 6bc514b, "add HF compat") loads the model with
``from_pretrained_no_processing`` — raw W_U, no gain, no centring; and this project's own output lens
(``core.lens.output_lens``: RMSNorm of the direction, gain, softcap), which is what its analysis uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd
import torch
from tokenizers import Tokenizer

from core.compute.engine import RowStats, row_stats
from core.registry import Release, SaeRef
from core.store import atomic
from core.weights.model_weights import ModelCheckpoint
from core.weights.sae_formats import SaeWeights

DASHBOARD_K = 10  # sae_dashboard/components_config.py: LogitsTableConfig.n_rows
DECIMALS = 3  # neuronpedia_converter.py: FeatureProcessor.round_list
OUT_OF_RANGE_TOKEN = "<|outofrange|>"  # neuronpedia_runner.py
# neuronpedia_runner.py's HTML_ANOMALIES, applied in this order to each vocabulary key (byte-level BPE spellings of
# dashes, curly quotes, zero-width space, space, newline, tab).
HTML_ANOMALIES = {
    "âĢĶ": "—",
    "âĢĵ": "–",
    "âĢľ": "“",
    "âĢĿ": "”",
    "âĢĺ": "‘",
    "âĢĻ": "’",
    "âĢĭ": " ",
    "Ġ": " ",
    "Ċ": "\n",
    "ĉ": "\t",
}
FRAME_COLUMNS = ["feature", "pos_str", "pos_values", "neg_str", "neg_values", "pos_ids", "neg_ids"]
FEATURE_FIELDS = ["feature_index", "pos_str", "pos_values", "neg_str", "neg_values"]


def dashboard_top_logits(sae: SaeWeights, checkpoint: ModelCheckpoint, device: str | None = None) -> RowStats:
    """Top/bottom ``DASHBOARD_K`` of ``logit[i, t] = d_i · U[:, t]`` (module docstring), streamed by the engine in
    float32, SAEDashboard's default model dtype (values are rounded to 3 decimals, which a bfloat16 product would
    not reproduce). Computed as ``(g ⊙ d_i) · W_U[:, t] − (g ⊙ d_i) · mean_t' W_U[:, t']`` (the last term only
    where the vocabulary is centred): the gain folded into the feature side and the centring a per-feature offset
    (it moves every logit of the feature alike, so the order is the same), so no processed copy of the
    unembedding — 2.2 GiB at Gemma-2-2B's vocabulary — is made."""
    left = sae.decoder_directions() * checkpoint.final_norm_gain()
    unembedding = checkpoint.unembedding()
    stats = row_stats(left, unembedding, k=DASHBOARD_K, compute_dtype=torch.float32, device=device)
    if checkpoint.geometry.final_softcap is not None:  # TransformerLens leaves a softcapped W_U uncentred
        return stats
    return stats.shifted(-(left @ unembedding.mean(dim=0)))


def dashboard_token(piece: str) -> str:
    """A vocabulary key as SAEDashboard writes it: ``HTML_ANOMALIES`` replaced in order (``Ġthe`` → `` the``)."""
    for anomaly, replacement in HTML_ANOMALIES.items():
        piece = piece.replace(anomaly, replacement)
    return piece


def dashboard_tokens(tokenizer_json: Path, vocab_size: int) -> list[str]:
    """The string of each token id < ``vocab_size`` as SAEDashboard's ``get_vocab_dict`` gives it: the tokenizer's
    vocabulary key (added tokens included, as ``tokenizer.vocab``) through ``dashboard_token``;
    ``OUT_OF_RANGE_TOKEN`` for ids no key maps to (embedding padding rows)."""
    tokens = [OUT_OF_RANGE_TOKEN] * vocab_size
    for piece, token_id in Tokenizer.from_file(str(tokenizer_json)).get_vocab(with_added_tokens=True).items():
        if token_id < vocab_size:
            tokens[token_id] = dashboard_token(piece)
    return tokens


def rounded(values: torch.Tensor) -> list[list[float]]:
    """``np.round(values, 3)`` per row, as SAEDashboard rounds the float32 logits (in float64)."""
    return np.round(values.double().numpy(), DECIMALS).tolist()


def dashboard_frame(stats: RowStats, tokens: list[str]) -> pd.DataFrame:
    """One row per feature: ``feature, pos_str, pos_values, neg_str, neg_values`` (lists, most extreme first,
    values rounded) and ``pos_ids, neg_ids`` (their token ids), with ``tokens`` from ``dashboard_tokens``."""
    top, bottom = stats.top_ids.tolist(), stats.bottom_ids.tolist()
    return pd.DataFrame(
        {
            "feature": range(len(top)),
            "pos_str": [[tokens[i] for i in row] for row in top],
            "pos_values": rounded(stats.top_values),
            "neg_str": [[tokens[i] for i in row] for row in bottom],
            "neg_values": rounded(stats.bottom_values),
            "pos_ids": top,
            "neg_ids": bottom,
        }
    )[FRAME_COLUMNS]


@dataclass(frozen=True)
class NeuronpediaSource:
    """Where a batch belongs on Neuronpedia: the batch's ``model_id, layer, sae_set, sae_id_suffix``."""

    model_id: str
    layer: int
    sae_set: str
    sae_id_suffix: str | None

    @classmethod
    def parse(cls, neuronpedia_id: str) -> NeuronpediaSource:
        """From a Neuronpedia id ``{model_id}/{layer}-{sae_set}[__{sae_id_suffix}]`` (SAELens' ``neuronpedia``
        field; the suffix is SAEDashboard's ``np_sae_id_suffix``, "the __[np_sae_id_suffix] after the SAE Set")."""
        model_id, slash, source = neuronpedia_id.partition("/")
        layer, dash, rest = source.partition("-")
        sae_set, _, suffix = rest.partition("__")
        if not (slash and dash and layer.isdigit() and sae_set):
            raise ValueError(f"not a Neuronpedia id '{{model}}/{{layer}}-{{set}}[__{{suffix}}]': {neuronpedia_id!r}")
        return cls(model_id, int(layer), sae_set, suffix or None)

    @classmethod
    def of(cls, ref: SaeRef, release: Release) -> NeuronpediaSource:
        """The SAE's registry ``neuronpedia`` id parsed; without one, what SAEDashboard writes when given no
        Neuronpedia names: ``model_id`` the model (``release.model_repo``), the SAE's layer, ``sae_set`` the
        release id, no suffix."""
        if ref.neuronpedia is not None:
            return cls.parse(ref.neuronpedia)
        return cls(release.model_repo, ref.layer, release.id, None)


def neuronpedia_batch(frame: pd.DataFrame, source: NeuronpediaSource) -> dict[str, Any]:
    """SAEDashboard's batch object (``NeuronpediaDashboardBatch.to_dict``): ``model_id, layer, sae_set,
    sae_id_suffix, features``, each feature with ``FEATURE_FIELDS`` only — the activation-based fields (examples,
    histograms, correlations, ...) need text and are not written."""
    features = frame.rename(columns={"feature": "feature_index"})[FEATURE_FIELDS].to_dict(orient="records")
    return {
        "model_id": source.model_id,
        "layer": source.layer,
        "sae_set": source.sae_set,
        "sae_id_suffix": source.sae_id_suffix,
        "features": features,
    }


def write_json_export(frame: pd.DataFrame, source: NeuronpediaSource, folder: Path, sae_id: str) -> Path:
    """``folder/<sae_id, URL-quoted>.json``: the ``neuronpedia_batch`` of ``frame``, written atomically."""
    path = folder / f"{quote(sae_id, safe='')}.json"
    return atomic.write_text(path, json.dumps(neuronpedia_batch(frame, source)))
