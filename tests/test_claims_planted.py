"""Recovery of the planted truth by the classification / profile / claims code, on the tables the whole
asset chain stored (session fixture ``chain``: every SAE of both planted releases, every feature
through both lenses and the attention circuits of its layer).

Also a "null SAE" (fresh random directions as features) through the same classification, which must
be called output-predicting at the calibrated false-positive rate.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from assets.interactions import load
from core.circuits import input_lens
from core.classify import classify_features
from core.claims import CLASS_TABLES, render_report, results_from_tables
from core.discovery import discover_saes
from core.frames import summary_frame, topk_frame
from core.model_weights import TOKENIZER_FILE
from core.output_lens import null_directions, output_lens
from core.registry import get_release
from core.storage import TableStore
from core.truth import load_truth
from core.vocab import token_strings
from orchestration.resources import HubResource

N_NULL = 512


def lens_rows(stats_f, stats_n, tokens):
    tok = pd.concat([topk_frame(stats_f, tokens).assign(sample="feature"), topk_frame(stats_n, tokens).assign(sample="null")])
    summ = pd.concat([summary_frame(stats_f).assign(sample="feature"), summary_frame(stats_n).assign(sample="null")])
    return tok.rename(columns={"row": "feature"}), summ.rename(columns={"row": "feature"})


def null_sae_rates(release_id: str, hub: HubResource) -> list[tuple[float, float]]:
    """For the first and last SAE: (fraction of fresh random directions called output-predicting,
    calibrated false-positive rate of the rule on the null sample)."""
    saes = sorted(discover_saes(release_id, hub.client()).saes, key=lambda r: r.layer)
    rates = []
    for ref in (saes[0], saes[-1]):
        snapshot, checkpoint, _ = load(ref, hub)
        g = checkpoint.geometry
        tokens = token_strings(snapshot.path(TOKENIZER_FILE), g.vocab_size)
        null = null_directions(N_NULL, g.d_model, ref.key)
        fresh = null_directions(N_NULL, g.d_model, ref.key + "/fresh")
        o_tok, o_stats = lens_rows(output_lens(fresh, checkpoint), output_lens(null, checkpoint), tokens)
        i_tok, i_stats = lens_rows(input_lens(fresh, checkpoint), input_lens(null, checkpoint), tokens)
        classes = classify_features(o_tok, o_stats, i_tok, i_stats, checkpoint.unembedding().numpy(),
                                    checkpoint.embedding().numpy())
        rates.append((float(classes.features["output_predicting"].mean()), classes.null_rate))
    return rates


@pytest.fixture(scope="module")
def planted(chain, planted_cache):
    torch.set_num_threads(2)
    _, data, _ = chain
    store = TableStore(data)
    frames = {name: store.read(name) for name in CLASS_TABLES}
    hub = HubResource(cache_dir=str(planted_cache), offline=True)
    out = {}
    for release_id in RELEASES:
        truth = load_truth(release_id, hub.client()).data
        out[release_id] = {"results": results_from_tables(get_release(release_id), frames, truth, n_boot=500),
                           "truth": truth, "frames": frames, "fresh_rates": null_sae_rates(release_id, hub)}
    return out


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
    """Plots are valid, non-trivial PNGs; the layers the chain did not analyse are reported as a gap."""
    from assets.plots import PLOTS, write_plots

    for release_id, p in planted.items():
        r = p["results"]
        analysed = set(p["frames"]["feature_classes"].query("release == @release_id")["layer"])
        assert len(analysed) == 3 and r.missing_layers == sorted(set(range(get_release(release_id).n_layers)) - analysed)
        paths = write_plots(r, tmp_path / release_id)
        assert set(paths) == set(PLOTS)
        for path in paths.values():
            data = path.read_bytes()
            assert data.startswith(b"\x89PNG") and len(data) > 20_000, path
        text = render_report(r, {k: v.name for k, v in paths.items()})
        assert f"Layers without an analysed SAE: {', '.join(map(str, r.missing_layers))}" in text
        for claim in ("C1 output-predicting fraction", "C2 attention depth profiles", "C3 semantic vs non-semantic", "C4 phase means"):
            assert claim in text
        assert "Planted ground truth" in text and "c2_depth_profiles.png" in text
