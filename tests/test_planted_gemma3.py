"""planted-gemma3: a Gemma-3-architecture model with Gemma Scope 2 format SAEs, read back through the registry,
the hub cache, the Gemma Scope 2 loader and the Gemma 3 geometry, and its planted truth recovered:

* transformers loads the model repo as ``Gemma3ForCausalLM`` (q/k head norms, sliding and full layers);
* the registry's Gemma Scope 2 pattern discovers every SAE, and only the tensors the analysis needs are fetched;
* the output lens finds exactly the planted output-predicting features (their token group fills the top tokens;
  no group shows in a non-semantic feature's top tokens);
* with the layer pairing (an SAE at layer L: decoder read by attention layer L+1, encoder written by layer L) the
  pipeline's circuits (``core.lens.circuits``, q/k head norms folded) find the planted features' token groups at the
  strongly planted layers and agree with the reference helper of ``tests/test_planted.py``, whose robust z profile
  follows both planted depth shapes.

``tests/test_gemma3_chain.py`` runs the unchanged asset chain on it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.lens.circuits import Circuit, VocabOperands, circuit_stats
from core.lens.output_lens import output_lens
from core.registry import get_release
from core.release_watch import tracked_releases
from core.testbeds.planted import PlantedTruth, generate
from core.weights.discovery import discover_saes, fetch_model, fetch_sae
from core.weights.hub import Hub
from core.weights.sae_formats import FORMATS
from tests.test_planted import Circuits, load_model, z_profiles

pytestmark = pytest.mark.unit

RELEASE = "planted-gemma3"


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, PlantedTruth]:
    cache = tmp_path_factory.mktemp("hub-gemma3")
    return cache, generate(RELEASE, cache)


@pytest.fixture(scope="module")
def loaded(planted):
    """(checkpoint, {layer: (ref, SaeWeights, truth of that SAE)}, group id per token)."""
    cache, truth = planted
    hub = Hub(cache_dir=cache, offline=True)
    release = get_release(RELEASE)
    _, checkpoint = fetch_model(RELEASE, hub)
    saes = {}
    for ref in discover_saes(RELEASE, hub).saes:
        sae = FORMATS[release.format].read(fetch_sae(ref, hub).path(ref.folder), d_model=checkpoint.geometry.d_model)
        saes[ref.layer] = (ref, sae, truth.data["saes"][ref.sae_id])
    group_of = np.full(checkpoint.geometry.vocab_size, -1)
    for g in truth.data["token_groups"]:
        group_of[g["token_ids"]] = g["id"]
    return checkpoint, saes, group_of


def test_transformers_loads_a_gemma3_model(planted):
    cache, truth = planted
    model = AutoModelForCausalLM.from_pretrained(truth.model_repo, cache_dir=cache, local_files_only=True)
    cfg = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM" and cfg.model_type == "gemma3_text"
    assert cfg.tie_word_embeddings and cfg.query_pre_attn_scalar == 24 != cfg.head_dim
    assert cfg.attn_logit_softcapping is None and cfg.final_logit_softcapping is None
    assert set(cfg.layer_types) == {"sliding_attention", "full_attention"}
    assert model.model.layers[0].self_attn.q_norm.weight.shape == (cfg.head_dim,)
    tok = AutoTokenizer.from_pretrained(truth.model_repo, cache_dir=cache, local_files_only=True)
    with torch.no_grad():
        assert torch.isfinite(model(**tok(" The runner was running home", return_tensors="pt")).logits).all()


def test_registry_loader_and_geometry_read_the_release(loaded, planted):
    checkpoint, saes, _ = loaded
    _, truth = planted
    g, p = checkpoint.geometry, truth.data["params"]
    assert (g.architecture, g.qk_norm, g.attn_softcap, g.final_softcap) == ("gemma3", True, None, None)
    assert sorted(saes) == list(range(p["n_layers"]))
    ref, sae, _ = saes[2]
    assert (ref.sae_id, ref.folder) == ("layer_2_width_256_l0_medium", "resid_post/layer_2_width_256_l0_medium")
    assert sae.source.endswith("params.safetensors") and (sae.d_model, sae.d_sae) == (p["d_model"], p["d_sae"])
    torch.testing.assert_close(sae.decoder_norms, torch.ones(p["d_sae"]))
    assert RELEASE not in [r.id for r in tracked_releases()]  # the sensor's planted set is unchanged


def test_output_lens_recovers_the_planted_output_features(loaded, planted):
    checkpoint, saes, group_of = loaded
    _, truth = planted
    sizes = {g["id"]: len(g["token_ids"]) for g in truth.data["token_groups"]}
    for ref, sae, sae_truth in saes.values():
        semantic = {f["index"]: f["output_group"] for f in sae_truth["semantic_features"]}
        top = group_of[output_lens(sae.decoder_directions(), checkpoint, k=10).top_ids.numpy()]  # (d_sae, 10)
        for i, group in semantic.items():  # the output group fills the top min(10, |group|) tokens
            assert (top[i, : min(10, sizes[group])] == group).mean() >= 0.8, (ref.sae_id, i)
        dominant = np.array([np.bincount(row[row >= 0], minlength=1).max(initial=0) for row in top])
        called = set(np.flatnonzero(dominant >= 5).tolist())  # top 10 dominated by one token group
        assert called == set(semantic), ref.sae_id  # precision and recall 1


def test_paired_circuits_recover_the_planted_structure(loaded, planted):
    checkpoint, saes, group_of = loaded
    cache, truth = planted
    attn = truth.data["attention"]
    operands = VocabOperands(checkpoint, "cpu")
    circ = Circuits(*load_model(cache, truth.model_repo))
    hits: dict[str, list[float]] = {"decoder_unembedding": [], "encoder_embedding": []}
    for layer, (_, sae, sae_truth) in sorted(saes.items()):
        sem = {f["index"]: f for f in sae_truth["semantic_features"]}
        cases = [
            (
                "encoder_embedding",
                "ov_writer",
                layer,
                sae.encoder_directions(),
                sae_truth["attention_encoder_features"],
                "input_group",
                circ.ov_writer,
            )
        ]
        if layer + 1 < checkpoint.geometry.n_layers:  # the decoder is read by the NEXT layer
            cases.append(
                (
                    "decoder_unembedding",
                    "qk_feature_key",
                    layer + 1,
                    sae.decoder_directions(),
                    sae_truth["attention_decoder_features"],
                    "output_group",
                    circ.qk_feature_key,
                )
            )
        for phase, kind, attn_layer, directions, feats, group_key, reference in cases:
            per_head = []
            for head in range(checkpoint.geometry.n_heads):
                stats = circuit_stats(directions[feats], Circuit(phase, kind, attn_layer, head), operands, k=10)
                torch.testing.assert_close(
                    stats.top_values.mean(1).float(),
                    reference(directions[feats].float(), attn_layer, head),
                    rtol=2e-3,
                    atol=2e-3,
                )
                want = np.array([sem[f][group_key] for f in feats])[:, None]
                per_head.append((group_of[stats.top_ids.numpy()] == want).mean())
            hits[phase].append(float(np.mean(per_head)))
    for phase, values in hits.items():
        strength = np.array(attn[phase]["strength"]).mean(1)
        assert np.array(values)[strength == strength.max()].min() > 0.5, (phase, values)  # the group is selected
        assert np.array(values)[strength == strength.min()].max() < 0.5, (phase, values)  # weakly planted: not


def test_z_profiles_follow_the_planted_shapes(planted):
    cache, truth = planted
    attn = truth.data["attention"]
    profiles = z_profiles(cache, truth)
    for phase in ("encoder_embedding", "decoder_unembedding"):
        z, s = profiles[phase]["attn"], np.array(attn[phase]["strength"]).mean(1)
        assert np.corrcoef(z, s)[0, 1] > 0.9 and z.max() > 3 and z.min() < 1.5, (phase, z)
    assert attn["encoder_embedding"]["shape"] == "U" and attn["decoder_unembedding"]["shape"] == "inverted-U"
