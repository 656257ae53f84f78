"""The Neuronpedia top-logits export is SAEDashboard 0.8.0's convention (``core.report.neuronpedia``), checked against
an independent computation from transformers' own modules, and its batch file is Neuronpedia's schema."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.registry import get_release, parse_key
from core.report.neuronpedia import (
    FEATURE_FIELDS,
    OUT_OF_RANGE_TOKEN,
    NeuronpediaSource,
    dashboard_frame,
    dashboard_tokens,
    dashboard_top_logits,
    neuronpedia_batch,
    write_json_export,
)
from core.testbeds.planted import generate
from core.weights.discovery import fetch_model, fetch_sae
from core.weights.hub import Hub
from core.weights.model_weights import TOKENIZER_FILE
from core.weights.sae_formats import FORMATS, SaeWeights
from core.weights.vocab import token_strings

pytestmark = pytest.mark.unit

GEMMA, LLAMA, GEMMA3 = (
    "planted-gemma:layer_0/width_512/average_l0_32",
    "planted-llama:l2r_8x",
    "planted-gemma3:layer_1_width_256_l0_medium",
)
# sae_dashboard/neuronpedia/neuronpedia_runner.py (v0.8.0) HTML_ANOMALIES, transcribed for the independent check.
SAEDASHBOARD_REPLACEMENTS = [
    ("âĢĶ", "\u2014"),
    ("âĢĵ", "\u2013"),
    ("âĢľ", "\u201c"),
    ("âĢĿ", "\u201d"),
    ("âĢĺ", "\u2018"),
    ("âĢĻ", "\u2019"),
    ("âĢĭ", " "),
    ("Ġ", " "),
    ("Ċ", "\n"),
    ("ĉ", "\t"),
]


@pytest.fixture(scope="module")
def cache(planted_cache):
    """The session's planted cache plus planted-gemma3 (Gemma gain, no softcap: centring on)."""
    generate("planted-gemma3", planted_cache)
    return planted_cache


def load(cache, key: str):
    """(snapshot, checkpoint, SAE) of a planted SAE key."""
    hub = Hub(cache_dir=cache, offline=True)
    ref = parse_key(key)
    snapshot, checkpoint = fetch_model(ref.release, hub)
    sae = FORMATS[get_release(ref.release).format].read(fetch_sae(ref, hub).path(ref.folder))
    return snapshot, checkpoint, sae


def transformers_logits(checkpoint, sae: SaeWeights) -> tuple[torch.Tensor, bool]:
    """(logits, centred) computed from transformers' modules the way TransformerLens' ``from_pretrained`` and
    SAEDashboard do: unit decoder rows times W_U with the final norm's gain folded (read off the norm module:
    ``norm(ones) · sqrt(1 + eps)``), centred over the vocabulary unless the config has a final logit softcap."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint.root).float()
    d_model, eps = model.config.hidden_size, model.config.rms_norm_eps
    with torch.no_grad():
        gain = model.model.norm(torch.ones(1, d_model))[0] * math.sqrt(1 + eps)
        W_U = model.get_output_embeddings().weight.T * gain[:, None]  # (d_model, vocab), TransformerLens' layout
        centred = not getattr(model.config, "final_logit_softcapping", None)
        if centred:
            W_U = W_U - W_U.mean(-1, keepdim=True)
        directions = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)
        return directions @ W_U, centred


def vocab_keys(snapshot, vocab_size: int) -> list[str]:
    """SAEDashboard's ``get_vocab_dict`` from transformers' tokenizer: ``tokenizer.vocab`` keys, replaced."""
    tokens = [OUT_OF_RANGE_TOKEN] * vocab_size
    for piece, i in AutoTokenizer.from_pretrained(snapshot.path(TOKENIZER_FILE).parent).vocab.items():
        for anomaly, replacement in SAEDASHBOARD_REPLACEMENTS:
            piece = piece.replace(anomaly, replacement)
        tokens[i] = piece
    return tokens


@pytest.mark.parametrize("key, softcapped", [(GEMMA, True), (LLAMA, False), (GEMMA3, False)])
def test_top_logits_match_transformers(cache, key, softcapped):
    """Every feature: the ids are a top/bottom 10 of the independent logits, the values are those logits rounded
    to 3 decimals, the strings are the vocabulary keys with SAEDashboard's replacements."""
    snapshot, checkpoint, sae = load(cache, key)
    frame = dashboard_frame(
        dashboard_top_logits(sae, checkpoint),
        dashboard_tokens(snapshot.path(TOKENIZER_FILE), checkpoint.geometry.vocab_size),
    )
    logits, centred = transformers_logits(checkpoint, sae)
    assert centred is not softcapped and len(frame) == sae.d_sae
    keys = vocab_keys(snapshot, checkpoint.geometry.vocab_size)
    for side, largest in (("pos", True), ("neg", False)):
        ids = torch.tensor(frame[f"{side}_ids"].tolist())
        expected = logits.topk(10, dim=1, largest=largest).values
        torch.testing.assert_close(logits.gather(1, ids), expected, rtol=0, atol=1e-5)  # a top 10 (ties aside)
        values = np.array(frame[f"{side}_values"].tolist())
        assert np.array_equal(values, np.round(values, 3))  # 3 decimals
        assert np.abs(values - expected.double().numpy()).max() <= 5e-4 + 1e-5
        assert np.mean(values == np.round(expected.double().numpy(), 3)) > 0.99  # off only at a rounding edge
        assert frame[f"{side}_str"].tolist() == [[keys[i] for i in row] for row in ids.tolist()]


def test_each_convention_step_changes_the_result(cache):
    """Unit rows, gain and centring each matter on the planted models, so the tests above can fail; the old
    raw product ``W_dec · W_U`` ranks other tokens first for most features."""
    _, checkpoint, sae = load(cache, GEMMA)
    stats = dashboard_top_logits(sae, checkpoint)
    raw = (sae.W_dec @ checkpoint.unembedding().T).topk(10, dim=1).indices
    assert (raw != stats.top_ids).any(dim=1).float().mean() > 0.9  # gain folded: another ranking
    assert (checkpoint.final_norm_gain() - 1).abs().max() > 0.3

    _, checkpoint, sae = load(cache, LLAMA)
    assert (sae.decoder_norms - 1).abs().max() > 0.3  # Llama Scope-like norms: unit rows change the values
    rescaled = dataclasses.replace(sae, W_dec=sae.W_dec * torch.linspace(0.5, 3.0, sae.d_sae)[:, None])
    torch.testing.assert_close(
        dashboard_top_logits(rescaled, checkpoint).top_values, dashboard_top_logits(sae, checkpoint).top_values
    )  # only the direction counts
    logits, _ = transformers_logits(checkpoint, sae)
    uncentred = (
        logits + (sae.decoder_directions() @ (checkpoint.unembedding() * checkpoint.final_norm_gain()).mean(0))[:, None]
    )
    values = np.array(
        dashboard_frame(dashboard_top_logits(sae, checkpoint), [""] * logits.shape[1])["pos_values"].tolist()
    )
    assert np.mean(values != np.round(uncentred.topk(10, dim=1).values.double().numpy(), 3)) > 0.3  # centring shows


def test_token_strings_are_vocabulary_keys_with_replacements(tmp_path, cache):
    """A tiny vocabulary with every replaced spelling, ids past it read '<|outofrange|>'; and on the planted GPT-2
    vocabulary the keys differ from ``decode`` (byte pieces stay pieces)."""
    pieces = ["Ġthe", "Ċ", "ĉif", "âĢĶ", "âĢĵ", "âĢľhiâĢĿ", "âĢĺâĢĻ", "aâĢĭb", "▁word", "<|endoftext|>", "ĠĠ"]
    path = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<|endoftext|>")).save(str(path))
    assert dashboard_tokens(path, len(pieces) + 2) == [
        " the",
        "\n",
        "\tif",
        "\u2014",
        "\u2013",
        "\u201chi\u201d",
        "\u2018\u2019",
        "a b",
        "▁word",
        "<|endoftext|>",
        "  ",
        OUT_OF_RANGE_TOKEN,
        OUT_OF_RANGE_TOKEN,
    ]

    snapshot, checkpoint, _ = load(cache, GEMMA)
    tokens = dashboard_tokens(snapshot.path(TOKENIZER_FILE), checkpoint.geometry.vocab_size)
    assert tokens == vocab_keys(snapshot, checkpoint.geometry.vocab_size)
    assert (tokens[198], tokens[197], tokens[960]) == ("\n", "\t", "\u2014")  # GPT-2's Ċ, ĉ, âĢĶ
    decoded = token_strings(snapshot.path(TOKENIZER_FILE), checkpoint.geometry.vocab_size)
    ids = AutoTokenizer.from_pretrained(snapshot.path(TOKENIZER_FILE).parent).vocab
    assert (tokens[ids["Ġthe"]], decoded[ids["Ġthe"]]) == (" the", " the")
    assert (tokens[ids["Ã©"]], decoded[ids["Ã©"]]) == ("Ã©", "é")  # a key, not its decode
    assert (tokens[ids["âĢ"]], decoded[ids["âĢ"]]) == ("âĢ", "\ufffd")  # an incomplete UTF-8 byte piece


def test_batch_json_is_neuronpedias_schema(cache, tmp_path):
    ref = parse_key(GEMMA)
    snapshot, checkpoint, sae = load(cache, GEMMA)
    frame = dashboard_frame(
        dashboard_top_logits(sae, checkpoint),
        dashboard_tokens(snapshot.path(TOKENIZER_FILE), checkpoint.geometry.vocab_size),
    )
    source = NeuronpediaSource.of(ref, get_release(ref.release))
    path = write_json_export(frame, source, tmp_path, ref.sae_id)
    assert path.name == "layer_0%2Fwidth_512%2Faverage_l0_32.json" and not list(tmp_path.glob(".*.tmp"))
    batch = json.loads(path.read_text())
    assert list(batch) == ["model_id", "layer", "sae_set", "sae_id_suffix", "features"]
    assert (batch["model_id"], batch["layer"], batch["sae_set"], batch["sae_id_suffix"]) == (
        "gemma-2-tiny",
        0,
        "plantedscope-res-512",
        None,
    )  # registry id gemma-2-tiny/0-plantedscope-res-512
    assert [f["feature_index"] for f in batch["features"]] == list(range(sae.d_sae))
    assert all(list(f) == FEATURE_FIELDS for f in batch["features"])
    record = batch["features"][3]
    assert record["pos_str"] == frame.iloc[3].pos_str and record["neg_values"] == frame.iloc[3].neg_values
    assert all(
        isinstance(v, float) and len(s) == 10
        for f in batch["features"]
        for v, s in zip(f["pos_values"] + f["neg_values"], [f["pos_str"]] * 20)
    )
    assert neuronpedia_batch(frame.head(2), source)["features"][1]["feature_index"] == 1


@pytest.mark.parametrize(
    "neuronpedia_id, parsed",
    [
        ("gemma-2-2b/12-gemmascope-res-16k", ("gemma-2-2b", 12, "gemmascope-res-16k", None)),
        ("gemma-2-2b/5-gemmascope-res-1m__l0-114", ("gemma-2-2b", 5, "gemmascope-res-1m", "l0-114")),
        ("llama3.1-8b/31-llamascope-res-32k", ("llama3.1-8b", 31, "llamascope-res-32k", None)),
    ],
)
def test_neuronpedia_ids_parse(neuronpedia_id, parsed):
    assert NeuronpediaSource.parse(neuronpedia_id) == NeuronpediaSource(*parsed)


@pytest.mark.parametrize("bad", ["gemma-2-2b", "gemma-2-2b/gemmascope-res-16k", "gemma-2-2b/12-", "m/x-set"])
def test_malformed_neuronpedia_ids_raise(bad):
    with pytest.raises(ValueError, match="not a Neuronpedia id"):
        NeuronpediaSource.parse(bad)


# SAELens sae_lens/pretrained_saes.yaml (jbloomAus/SAELens 91ca16ccd0684e4dd6323cd4f23ded734339ec54), `neuronpedia`
SAELENS_NEURONPEDIA = {
    "gemma-scope-2b-pt-res:layer_12/width_16k/average_l0_176": "gemma-2-2b/12-gemmascope-res-16k__l0-176",
    "gemma-scope-2b-pt-res:layer_19/width_65k/average_l0_216": "gemma-2-2b/19-gemmascope-res-65k__l0-216",
    "gemma-scope-2b-pt-res:layer_5/width_1m/average_l0_9": "gemma-2-2b/5-gemmascope-res-1m__l0-9",
    "gemma-scope-2b-pt-res-canonical:layer_0/width_16k/canonical": "gemma-2-2b/0-gemmascope-res-16k",
    "gemma-scope-2b-pt-res-canonical:layer_12/width_262k/canonical": "gemma-2-2b/12-gemmascope-res-262k",
    "gemma-scope-2b-pt-res-canonical:layer_25/width_65k/canonical": "gemma-2-2b/25-gemmascope-res-65k",
    "gemma-scope-9b-pt-res:layer_0/width_131k/average_l0_30": "gemma-2-9b/0-gemmascope-res-131k__l0-30",
    "gemma-scope-9b-pt-res:layer_20/width_1m/average_l0_193": "gemma-2-9b/20-gemmascope-res-1m__l0-193",
    "gemma-scope-9b-pt-res-canonical:layer_41/width_16k/canonical": "gemma-2-9b/41-gemmascope-res-16k",
    "gemma-scope-9b-pt-res-canonical:layer_17/width_131k/canonical": "gemma-2-9b/17-gemmascope-res-131k",
    "llama_scope_lxr_8x:l0r_8x": "llama3.1-8b/0-llamascope-res-32k",
    "llama_scope_lxr_8x:l31r_8x": "llama3.1-8b/31-llamascope-res-32k",
}


@pytest.mark.parametrize("key", sorted(SAELENS_NEURONPEDIA))
def test_registry_neuronpedia_ids_are_saelens(key):
    ref = parse_key(key)
    assert ref.neuronpedia == SAELENS_NEURONPEDIA[key]
    assert NeuronpediaSource.parse(ref.neuronpedia).layer == ref.layer


def test_canonical_sae_takes_the_canonical_id_whichever_way_it_is_named():
    """A concrete folder that is the canonical one exports under the set Neuronpedia hosts (no __l0 suffix)."""
    by_folder = parse_key("gemma-scope-2b-pt-res:layer_12/width_16k/average_l0_82")
    assert by_folder == parse_key("gemma-scope-2b-pt-res-canonical:layer_12/width_16k/canonical")
    assert by_folder.neuronpedia == "gemma-2-2b/12-gemmascope-res-16k"


def test_release_without_an_id_uses_saedashboards_defaults():
    ref = parse_key("planted-gemma-null:layer_2/width_512/average_l0_32")
    assert (
        ref.neuronpedia is None and parse_key("gemma-scope-2-1b-pt-res:layer_7_width_16k_l0_small").neuronpedia is None
    )
    assert NeuronpediaSource.of(ref, get_release(ref.release)) == NeuronpediaSource(
        "planted/gemma-2-tiny", 2, "planted-gemma-null", None
    )
