"""End-to-end recovery of the planted truth by the classification / profile / claims code.

The tables are built here with the same core functions the assets call (no Dagster, to stay within the
time budget of one test file): every feature through both vocabulary lenses, and the attention
participation of a feature subsample (every planted attention feature + 64 others) on three layers of
each planted release (first, middle, last). The full chain over every layer runs in tests/test_chain.py.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from assets.interactions import load
from core.circuits import Circuit, VocabOperands, circuit_stats, input_lens
from core.classify import classify_features
from core.claims import release_results, render_report
from core.discovery import discover_saes
from core.frames import circuit_frame, summary_frame, topk_frame, with_sae
from core.hub import Hub
from core.model_weights import TOKENIZER_FILE
from core.output_lens import null_directions, output_lens
from core.profiles import PHASE_KINDS, circuit_values, feature_participation, ov_write_frame, participation
from core.registry import get_release
from core.truth import load_truth
from core.vocab import token_strings
from orchestration.resources import HubResource

N_NULL = 512
N_CIRCUIT_NULL = 64
N_OTHERS = 64


def lens_rows(stats_f, stats_n, tokens):
    tok = pd.concat([topk_frame(stats_f, tokens).assign(sample="feature"), topk_frame(stats_n, tokens).assign(sample="null")])
    summ = pd.concat([summary_frame(stats_f).assign(sample="feature"), summary_frame(stats_n).assign(sample="null")])
    return tok.rename(columns={"row": "feature"}), summ.rename(columns={"row": "feature"})


def build_release(release_id: str, cache) -> dict:
    hub_res = HubResource(cache_dir=str(cache), offline=True)
    release = get_release(release_id)
    truth = load_truth(release_id, hub_res.client()).data
    saes = sorted(discover_saes(release_id, hub_res.client()).saes, key=lambda r: r.layer)
    picked = [saes[0], saes[len(saes) // 2], saes[-1]]
    out: dict[str, list[pd.DataFrame]] = {k: [] for k in ("classes", "null", "thresholds", "norms", "part", "fpart")}
    fresh_rates = []
    for ref in picked:
        snapshot, checkpoint, sae = load(ref, hub_res)
        g = checkpoint.geometry
        tokens = token_strings(snapshot.path(TOKENIZER_FILE), g.vocab_size)
        null = null_directions(N_NULL, g.d_model, ref.key)
        o_tok, o_stats = lens_rows(output_lens(sae.decoder_directions(), checkpoint), output_lens(null, checkpoint), tokens)
        i_tok, i_stats = lens_rows(input_lens(sae.encoder_directions(), checkpoint), input_lens(null, checkpoint), tokens)
        emb = checkpoint.embedding().numpy()
        unemb = emb if g.tied_embeddings else checkpoint.unembedding().numpy()
        classes = classify_features(o_tok, o_stats, i_tok, i_stats, unemb, emb)
        out["classes"].append(with_sae(classes.features, ref))
        out["null"].append(with_sae(classes.rows[classes.rows["sample"] == "null"].drop(columns="sample"), ref))
        out["thresholds"].append(with_sae(classes.thresholds, ref))
        out["norms"].append(with_sae(pd.DataFrame({"feature": range(sae.d_sae), "encoder_norm": sae.encoder_norms.numpy(),
                                                   "decoder_norm": sae.decoder_norms.numpy()}), ref))
        # a "null SAE": fresh random directions (another seed) as features, calibrated on the usual null
        fresh = null_directions(N_NULL, g.d_model, ref.key + "/fresh")
        f_tok, f_stats = lens_rows(output_lens(fresh, checkpoint), output_lens(null, checkpoint), tokens)
        fi_tok, fi_stats = lens_rows(input_lens(fresh, checkpoint), input_lens(null, checkpoint), tokens)
        fresh_classes = classify_features(f_tok, f_stats, fi_tok, fi_stats, unemb, emb)
        fresh_rates.append((fresh_classes.features["output_predicting"].mean(), classes.null_rate))
        # attention: a feature subsample through the encoder-phase QK circuits and the OV write norms
        planted_attn = sorted({f for fs in truth["attention"]["features_per_kv_head"][str(ref.layer)] for f in fs})
        rest = np.setdiff1d(np.arange(sae.d_sae), planted_attn)
        sub = np.sort(np.r_[planted_attn, np.random.default_rng(ref.layer).choice(rest, N_OTHERS, replace=False)])
        cnull = null_directions(N_CIRCUIT_NULL, g.d_model, ref.key)
        ops = VocabOperands(checkpoint, device="cpu")
        frames = []
        for head in range(g.n_heads):
            for kind in PHASE_KINDS["encoder_embedding"]:
                c = Circuit("encoder_embedding", kind, ref.layer, head)
                for sample, vecs, ids in (("feature", sae.encoder_directions()[sub], sub), ("null", cnull, np.arange(N_CIRCUIT_NULL))):
                    fr = circuit_frame(circuit_stats(vecs, c, ops), c, g).assign(sample=sample)
                    fr["feature"] = ids[fr["feature"].to_numpy()]
                    frames.append(fr)
        writes = ov_write_frame(sae.decoder_directions()[sub], cnull, checkpoint.attention(ref.layer), g, ref.layer)
        writes.loc[writes["sample"] == "feature", "feature"] = sub[writes.loc[writes["sample"] == "feature", "feature"].to_numpy()]
        part = participation(circuit_values(with_sae(pd.concat(frames, ignore_index=True), ref), with_sae(writes, ref)))
        out["part"].append(part[part["sample"] == "feature"].drop(columns="sample"))
        out["fpart"].append(feature_participation(part))
    frames = {k: pd.concat(v, ignore_index=True) for k, v in out.items()}
    arch = "llama" if release.format == "llama_scope_safetensors" else "gemma2"
    results = release_results(release_id, arch, release.n_layers, frames["classes"], frames["null"], frames["thresholds"],
                              frames["norms"], frames["part"], frames["fpart"], truth, n_boot=500)
    return {"results": results, "truth": truth, "fresh_rates": fresh_rates, "layers": [r.layer for r in picked]}


@pytest.fixture(scope="module")
def planted(planted_cache):
    torch.set_num_threads(2)
    return {r: build_release(r, planted_cache) for r in ("planted-gemma", "planted-llama")}


RELEASES = ("planted-gemma", "planted-llama")


@pytest.mark.parametrize("release_id", RELEASES)
def test_output_predicting_fraction_within_one_point(planted, release_id):
    r = planted[release_id]["results"]
    measured = r.by_layer["hits"].sum() / r.by_layer["n"].sum()
    assert abs(measured - r.truth.output.truth_fraction) <= 0.01
    assert r.truth.output.recall == 1.0


@pytest.mark.parametrize("release_id", RELEASES)
def test_semantic_separation(planted, release_id):
    assert planted[release_id]["results"].truth.semantic_auroc >= 0.99


@pytest.mark.parametrize("release_id", RELEASES)
def test_planted_depth_shapes_detected_with_the_right_sign(planted, release_id):
    r = planted[release_id]["results"]
    measured = r.shapes[r.shapes["statistic"] == "mean"].set_index("phase")
    for phase, shape in r.truth.shapes.items():
        assert measured.loc[phase, "shape"] == shape, (phase, measured.loc[phase].to_dict())
        assert np.sign(measured.loc[phase, "curvature"]) == (1 if shape == "U" else -1)


@pytest.mark.parametrize("release_id", RELEASES)
def test_planted_magnitude_difference_detected(planted, release_id):
    r = planted[release_id]["results"]
    comp = r.comparison.set_index("variable")
    assert comp.loc["encoder_norm", "rank_biserial"] > 0.9 and comp.loc["encoder_norm", "p_value"] < 1e-6
    assert r.measured_norm_ratio["encoder_norm"] == pytest.approx(r.truth.encoder_norm_ratio, rel=0.1)
    if release_id == "planted-llama":  # Llama Scope decoder norms vary; Gemma Scope's are 1
        assert comp.loc["decoder_norm", "rank_biserial"] > 0.9
    for phase_score in ("score_encoder_embedding", "score_decoder_unembedding"):
        assert comp.loc[phase_score, "p_value"] < 0.01


@pytest.mark.parametrize("release_id", RELEASES)
def test_null_sae_fraction_is_the_calibrated_false_positive_rate(planted, release_id):
    for fresh, calibrated in planted[release_id]["fresh_rates"]:
        assert calibrated <= 0.01
        assert abs(fresh - calibrated) <= 3 * np.sqrt(max(calibrated, 1 / N_NULL) / N_NULL)


def test_report_plots_and_missing_layers(planted, tmp_path):
    from assets.plots import PLOTS, write_plots

    for release_id, p in planted.items():
        r = p["results"]
        paths = write_plots(r, tmp_path / release_id)
        assert set(paths) == set(PLOTS)
        for path in paths.values():
            data = path.read_bytes()
            assert data.startswith(b"\x89PNG") and len(data) > 20_000, path
        r.plots = {k: v.name for k, v in paths.items()}
        text = render_report(r)
        missing = sorted(set(range(get_release(release_id).n_layers)) - set(p["layers"]))
        assert f"Layers without an analysed SAE: {', '.join(map(str, missing))}" in text
        for claim in ("C1 output-predicting fraction", "C2 attention depth profiles", "C3 semantic vs non-semantic", "C4 phase means"):
            assert claim in text
        assert "Planted ground truth" in text and "c2_depth_profiles.png" in text
        (tmp_path / release_id / "report.md").write_text(text)
