"""A release taken through the same core stages as the asset chain, without Dagster (``analyse``), and the
pure random models with pure random SAEs that the verdicts must not call ``consistent`` more often than
their error rate allows (``random_release_verdicts``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from core.analysis.claims import per_feature_table
from core.analysis.verdicts import claim_verdicts
from core.lens.control import control_sae
from core.stages import ClassTables, EngineSettings, circuit_stage, class_stage, lens_stage
from core.testbeds.planted import gpt2_tokenizer
from core.weights.model_weights import ModelCheckpoint
from core.weights.sae_formats import SaeWeights
from core.weights.vocab import normal_tokens, vocabulary_table

SIZE = dict(
    vocab_size=2048,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=6,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
)


def random_model(
    family: str, seed: int, folder: Path, edit: Callable[[torch.nn.Module], None] | None = None
) -> ModelCheckpoint:
    """A randomly initialised Gemma-2 / Llama model of ``SIZE`` with random norm gains (then ``edit``ed in place),
    saved with the real GPT-2 tokenizer's first 2048 tokens, read back as a checkpoint."""
    torch.manual_seed(seed)
    if family == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**SIZE, query_pre_attn_scalar=16))
    else:
        model = LlamaForCausalLM(LlamaConfig(**SIZE, tie_word_embeddings=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.2 + (0.0 if family == "gemma2" else 1.0))
            else:
                p.normal_(0.0, 0.3 if ("q_proj" in name or "k_proj" in name) else 0.1)
        if edit is not None:
            edit(model)
    model.save_pretrained(folder)
    gpt2_tokenizer(SIZE["vocab_size"]).save_pretrained(folder)
    return ModelCheckpoint(folder)


def random_sae(d_model: int, d_sae: int, seed: int) -> SaeWeights:
    gen = torch.Generator().manual_seed(seed)
    return SaeWeights(
        W_enc=torch.randn(d_model, d_sae, generator=gen),
        W_dec=torch.randn(d_sae, d_model, generator=gen),
        b_enc=torch.zeros(d_sae),
        b_dec=torch.zeros(d_model),
        threshold=torch.full((d_sae,), 0.1),
        source=f"random seed {seed}",
    )


def lens_classes(
    sae: SaeWeights, checkpoint: ModelCheckpoint, vocabulary: pd.DataFrame, key: str, n_null: int
) -> ClassTables:
    """The classes of ``sae`` from its lenses only (no circuits: the classes read only the lenses)."""
    lens = lens_stage(sae, checkpoint, vocabulary["token"].tolist(), key, n_null, EngineSettings())
    return classes_from_lens(lens, checkpoint, vocabulary)


def classes_from_lens(
    lens: dict[str, pd.DataFrame], checkpoint: ModelCheckpoint, vocabulary: pd.DataFrame
) -> ClassTables:
    """``class_stage`` on the lens tables alone (no circuit or participation tables)."""
    return class_stage(
        lens,
        pd.DataFrame(),
        pd.DataFrame(),
        normal_tokens(vocabulary),
        checkpoint.embedding().numpy(),
        checkpoint.unembedding().numpy(),
    )


def analyse(
    release: str,
    family: str,
    checkpoint: ModelCheckpoint,
    vocabulary: pd.DataFrame,
    saes: list[tuple[int, str, SaeWeights]],
    n_null: int = 128,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-direction table, ``claim_verdicts``) of ``saes`` = [(layer, sae_id, weights)] on ``checkpoint``,
    with the chain's stages (``core.stages``) and partition keys ``release:sae_id``."""
    settings = EngineSettings(k=10)
    classes, control, norms, parts, sensitivity = [], [], [], [], []
    tokens, normal = vocabulary["token"].tolist(), normal_tokens(vocabulary)
    for layer, sae_id, sae in saes:
        ids = {"release": release, "sae_id": sae_id, "layer": layer}
        key = f"{release}:{sae_id}"
        lens = lens_stage(sae, checkpoint, tokens, key, 4 * n_null, settings)
        circuits = circuit_stage(sae, checkpoint, key, layer, n_null, settings)
        out = class_stage(
            lens,
            circuits.circuit_stats.assign(**ids),
            circuits.head_writes.assign(**ids),
            normal,
            checkpoint.embedding().numpy(),
            checkpoint.unembedding().numpy(),
        )
        drawn = control_sae(sae, key, halves=())
        classes.append(out.rows("feature").assign(**ids))
        control.append(
            out.rows("control").assign(
                **ids, encoder_norm=drawn.encoder_norm.numpy(), decoder_norm=drawn.decoder_norm.numpy()
            )
        )
        norms.append(
            pd.DataFrame(
                {
                    **ids,
                    "feature": range(sae.d_sae),
                    "encoder_norm": sae.encoder_norms.numpy(),
                    "decoder_norm": sae.decoder_norms.numpy(),
                }
            )
        )
        parts.append(out.feature_participation)
        sensitivity.append(out.classes.sensitivity.assign(**ids))
    per_feature = per_feature_table(pd.concat(classes), pd.concat(control), pd.concat(norms), pd.concat(parts))
    return per_feature, claim_verdicts(
        release, family, checkpoint.geometry.n_layers, per_feature, pd.concat(sensitivity, ignore_index=True)
    )


def random_release_verdicts(family: str, seed: int, folder: Path, d_sae: int = 256) -> pd.DataFrame:
    """``claim_verdicts`` of a random ``family`` model with a random SAE at every layer."""
    checkpoint = random_model(family, seed, folder)
    vocabulary = vocabulary_table(folder / "tokenizer.json", checkpoint.geometry.vocab_size)
    saes = [
        (layer, f"l{layer}", random_sae(checkpoint.geometry.d_model, d_sae, seed * 1000 + layer))
        for layer in range(checkpoint.geometry.n_layers)
    ]
    return analyse(f"random-{family}-{seed}", family, checkpoint, vocabulary, saes)[1]
