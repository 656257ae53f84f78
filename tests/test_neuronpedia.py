"""The Neuronpedia top-logits export is exactly its definition: raw W_dec[i] · W_U, top/bottom 10."""

from __future__ import annotations

import json

import torch

from core.discovery import fetch_model, fetch_sae
from core.hub import Hub
from core.model_weights import TOKENIZER_FILE
from core.neuronpedia import dashboard_frame, raw_top_logits, write_json_export
from core.registry import parse_key
from core.sae_formats import FORMATS
from core.vocab import token_strings


def test_dashboard_top_logits_on_planted_llama(planted_cache):
    hub = Hub(cache_dir=planted_cache, offline=True)
    ref = parse_key("planted-llama:l2r_8x")
    snapshot, checkpoint = fetch_model(ref.release, hub)
    sae = FORMATS["llama_scope_safetensors"].read(fetch_sae(ref, hub).path(ref.folder))
    tokens = token_strings(snapshot.path(TOKENIZER_FILE), checkpoint.geometry.vocab_size)
    frame = dashboard_frame(raw_top_logits(sae.W_dec, checkpoint.unembedding()), tokens)

    logits = sae.W_dec @ checkpoint.unembedding().T  # the definition, materialised
    for feature in (0, 7, 511, 1023):
        top, bottom = logits[feature].topk(10), logits[feature].topk(10, largest=False)
        row = frame.iloc[feature]
        assert row.pos_str == [tokens[i] for i in top.indices.tolist()]
        assert row.neg_str == [tokens[i] for i in bottom.indices.tolist()]
        torch.testing.assert_close(torch.tensor(row.pos_values), top.values, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.tensor(row.neg_values), bottom.values, rtol=1e-5, atol=1e-5)
    # raw convention: the decoder norm scales the values (Llama Scope norms are not 1)
    assert not torch.allclose(sae.decoder_norms, torch.ones_like(sae.decoder_norms), atol=0.05)


def test_json_export_round_trips(planted_cache, tmp_path):
    hub = Hub(cache_dir=planted_cache, offline=True)
    ref = parse_key("planted-gemma:layer_0/width_512/average_l0_32")
    snapshot, checkpoint = fetch_model(ref.release, hub)
    sae = FORMATS["gemma_scope_npz"].read(fetch_sae(ref, hub).path(ref.folder))
    tokens = token_strings(snapshot.path(TOKENIZER_FILE), checkpoint.geometry.vocab_size)
    frame = dashboard_frame(raw_top_logits(sae.W_dec[:16], checkpoint.unembedding()), tokens)
    path = write_json_export(frame, tmp_path, ref.sae_id)
    assert path.name == "layer_0%2Fwidth_512%2Faverage_l0_32.json" and not list(tmp_path.glob(".*.tmp"))
    records = json.loads(path.read_text())
    assert [r["feature"] for r in records] == list(range(16))
    assert records[3]["pos_str"] == frame.iloc[3].pos_str and records[3]["neg_values"] == frame.iloc[3].neg_values
