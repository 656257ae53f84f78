"""The trained-release generator (core.testbeds.trained): deterministic files in the hub layout that the real loaders
read, a model that learned something, and SAEs whose stored quality is what the files do.

Small overrides (``tests.conftest.FAST_TRAINED``: a few dozen steps) keep this fast; the registry's parameters are
what ``python -m core.testbeds.trained`` trains (README, "Trained releases")."""

import json
from pathlib import Path

import dagster as dg
import pytest
import torch
from huggingface_hub import snapshot_download

from core.registry import get_release
from core.testbeds.trained import METRICS_FILE, corpus_split, generate, resid_post, sae_quality
from core.weights.hub_cache import repo_cache_dir
from core.weights.sae_formats import FORMATS
from tests.conftest import FAST_TRAINED

pytestmark = pytest.mark.chain  # trains small models: a minute


def _blobs(cache, repo):
    return sorted((p.name, p.stat().st_size) for p in (repo_cache_dir(cache, repo) / "blobs").iterdir())


@pytest.fixture(scope="module")
def two_runs(trained_llama, tmp_path_factory):
    """The session's trained-llama and a second generation with the same parameters."""
    b = tmp_path_factory.mktemp("b")
    return trained_llama, (b, generate("trained-llama", b, overrides=FAST_TRAINED))


def test_same_parameters_give_the_same_files_and_commits(two_runs):
    (a, ra), (b, rb) = two_runs
    assert (ra.model_commit, ra.sae_commit) == (rb.model_commit, rb.sae_commit)
    for repo in (ra.model_repo, ra.sae_repo):
        assert _blobs(a, repo) == _blobs(b, repo)


def test_the_model_learned_below_the_unigram_baseline_and_the_files_load_offline(two_runs, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (cache, release), _ = two_runs
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loss = release.metrics["loss_nats_per_token"]
    # 80 steps already beat the unigram baseline; the registry's 300 go 1.1 nats below it (README, "Trained releases")
    assert loss["heldout"] < loss["unigram_baseline"] and loss["train_last"] < loss["train_first"] - 0.8, loss
    model_dir = snapshot_download(release.model_repo, cache_dir=cache, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.model_type == "llama" and not model.config.tie_word_embeddings
    assert model.dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert (
        len(tok) == FAST_TRAINED["vocab_size"]
        and tok.decode(tok("def f(x): return x")["input_ids"]) == "def f(x): return x"
    )

    sae_dir = snapshot_download(release.sae_repo, cache_dir=cache, local_files_only=True)
    stored = json.loads((Path(sae_dir) / METRICS_FILE).read_text())
    _, heldout, source = corpus_split(stored["params"]["heldout_every"])
    assert stored["corpus"]["sha256"] == source["sha256"]
    assert (Path(sae_dir) / get_release("trained-llama").corpus).read_text() == "\n\n".join(heldout)

    # the stored quality is what the files do, read by the project's loader on the held-out split
    ids = torch.tensor(tok("\n\n".join(heldout)[:20000], add_special_tokens=False)["input_ids"])
    chunks = ids[: len(ids) // 64 * 64].view(-1, 64)
    model = model.float()
    for sae_id, q in stored["saes"].items():
        folder = Path(sae_dir) / q["folder"]
        x = resid_post(model, chunks, q["layer"])
        measured = sae_quality(x, folder, "llama_scope_safetensors")
        assert measured["variance_explained"] == pytest.approx(q["variance_explained"], abs=0.05), sae_id
        assert 0 < measured["l0"] < FAST_TRAINED["d_sae"]


def test_gemma_scope_files_keep_unit_decoder_rows_and_the_activations(tmp_path):
    """The Gemma Scope writer moves each decoder row's norm into the encoder: unit rows, same reconstruction."""
    release = generate("trained-gemma", tmp_path, overrides={**FAST_TRAINED, "steps": 5})
    sae_dir = snapshot_download(release.sae_repo, cache_dir=tmp_path, local_files_only=True)
    for q in release.metrics["saes"].values():
        sae = FORMATS["gemma_scope_npz"].read(Path(sae_dir) / q["folder"])
        assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.d_sae), atol=1e-5)
        assert q["folder"].endswith(f"average_l0_{round(q['l0'])}")
        assert -1 < q["variance_explained"] <= 1  # a 5-step model: quality is checked in the Llama test above


def test_activation_measurements_match_a_hand_computed_last_layer_case(two_runs):
    """Features set by hand at the last layer, where the next-token distribution is norm + lm_head of resid_post:
    feature 0 fires everywhere at 0.5 (decoder along token v's unembedding), feature 1 never fires. Its firing rate,
    per-token mean activation, contexts and ablation effect are known exactly; the effect is recomputed here through
    transformers' own final norm and lm_head."""
    from transformers import AutoModelForCausalLM

    from core.analysis.activations import ablation, firing
    from core.weights.sae_formats import SaeWeights

    (cache, release), _ = two_runs
    model = AutoModelForCausalLM.from_pretrained(
        snapshot_download(release.model_repo, cache_dir=cache, local_files_only=True), dtype=torch.float32
    )
    layer, d, v = model.config.num_hidden_layers - 1, model.config.hidden_size, 7
    chunks = torch.randint(0, FAST_TRAINED["vocab_size"], (6, 16), generator=torch.Generator().manual_seed(0))
    w_dec = torch.zeros(2, d)
    w_dec[0] = model.lm_head.weight[v].detach() / model.model.norm.weight.detach()
    w_dec[0] /= w_dec[0].norm()
    sae = SaeWeights(
        W_enc=torch.zeros(d, 2),
        W_dec=w_dec,
        b_enc=torch.tensor([0.5, -1e9]),
        b_dec=torch.zeros(d),
        threshold=torch.zeros(2),
        source="hand",
    )
    fired = firing(model, sae, layer, chunks, n_contexts=4, k=3, min_count=1)
    assert fired.features["firing_rate"].tolist() == [1.0, 0.0]
    assert fired.features["mean_activation"].tolist() == [0.5, 0.0]
    assert set(fired.fires_on["feature"]) == {0} and (fired.fires_on["mean_activation"] == 0.5).all()
    ctx = fired.contexts
    assert ctx["feature"].tolist() == [0] * 4 and (ctx["activation"] == 0.5).all()

    effects, promotes = ablation(model, sae, layer, chunks, ctx, {0: [v]}, k=5)
    x = resid_post(model, chunks, layer).view(*chunks.shape, d)
    clean, ablated = [], []
    for c, t in zip(ctx["chunk"], ctx["position"]):
        for out, h in ((clean, x[c, t]), (ablated, x[c, t] - 0.5 * w_dec[0])):
            out.append(model.lm_head(model.model.norm(h[None]))[0].log_softmax(-1))
    delta = (torch.stack(clean) - torch.stack(ablated)).mean(0).detach()
    drop = (torch.stack(clean).exp() - torch.stack(ablated).exp()).mean(0).detach()
    assert promotes["token_id"].tolist() == delta.topk(5).indices.tolist()
    assert promotes["delta"].to_numpy() == pytest.approx(delta.topk(5).values.numpy(), abs=1e-5)
    row = effects.set_index("feature").loc[0]
    assert row["output_score"] == pytest.approx(float(drop[v]), abs=1e-6) and row["n_contexts"] == 4
    assert list(effects["feature"]) == [0]  # a feature that never fires has no context to remove it from


def test_the_chain_runs_activation_agreement_for_a_corpus_release_and_the_report_pools_it(two_runs, tmp_path):
    """Through the CLI's chain (``materialize_all``): a release with a corpus gets ``activation_agreement`` per SAE,
    ``claim_statistics`` pools it into ``release_agreement`` and the report shows it beside its controls."""
    from core.analysis.claims import AGREEMENT_LABELS
    from core.store.storage import TableStore
    from tests.planted_chain import materialise_planted

    (cache, _), _ = two_runs
    instance, data, keys = materialise_planted(cache, tmp_path / "data", ["trained-llama"])
    assert len(keys) == get_release("trained-llama").n_layers
    done = {
        str(r.partition_key)
        for r in instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("activation_agreement")), limit=10
        ).records
    }
    assert done == set(keys)
    store = TableStore(data)
    per_sae = store.read("agreement_summary")
    assert set(per_sae["sae_id"]) == {key.partition(":")[2] for key in keys} and per_sae["p_value"].between(0, 1).all()
    pooled = store.read("release_agreement", "trained-llama").set_index("statistic")
    assert {
        "output_overlap",
        "input_overlap",
        "spearman_topk_z_output_score",
        "spearman_decoder_participation_attention",
        "spearman_out_semantic_score_output_coherence",
        "spearman_in_semantic_score_input_coherence",
    } <= set(pooled.index)
    readers = pooled.index.str.contains("attention")  # the last layer's SAE has no block reading it
    # semantic rows only where a list holds k normal forms (the fast model's 512 tokens leave few on the output side)
    semantic = pooled.index.str.contains("semantic")
    assert (pooled.loc[~readers & ~semantic, "saes"] == len(keys)).all()
    assert (pooled.loc[readers, "saes"] <= len(keys) - 1).all() and pooled.loc[semantic, "saes"].between(1, 4).all()
    assert pooled.loc["spearman_decoder_participation_attention", "saes"] == len(keys) - 1  # the AUROC: where both
    # participation calls occur
    assert pooled["control"].notna().all()
    report = (data / "reports" / "trained-llama" / "report.md").read_text()
    assert "## Activation agreement" in report and AGREEMENT_LABELS["output_overlap"] in report
    disagree = [AGREEMENT_LABELS.get(s, s) for s in pooled.index[~pooled["beyond_chance"].astype(bool)]]
    plain = next(line for line in report.splitlines() if "the readings disagree" in line or "Every reading" in line)
    assert all(label in plain for label in disagree) and (not disagree) == plain.startswith("Every reading")
    assert "Not measured: the release provides no corpus" not in report
    checks = [
        e.dagster_event.event_specific_data
        for run in instance.get_runs()
        for e in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
        if e.dagster_event.event_specific_data.asset_key == dg.AssetKey("activation_agreement")
    ]
    assert len(checks) == 3 * len(keys) and all(c.passed for c in checks), [(c.check_name, c.passed) for c in checks]


def test_attention_received_matches_a_loop_over_positions_and_heads(two_runs):
    """``attention_received`` against the definition, position by position: per head, the attention block 1 pays
    (transformers' eager probabilities) to the keys where a feature fires, over what uniform causal attention
    would pay them (key 0 left out); the last layer's SAE has no reader."""
    from transformers import AutoModelForCausalLM

    from core.analysis.activations import attention_received, sae_activations
    from core.weights.sae_formats import FORMATS

    (cache, release), _ = two_runs
    model = AutoModelForCausalLM.from_pretrained(
        snapshot_download(release.model_repo, cache_dir=cache, local_files_only=True),
        dtype=torch.float32,
        attn_implementation="eager",
    ).eval()
    sae_dir = Path(snapshot_download(release.sae_repo, cache_dir=cache, local_files_only=True))
    q = next(q for q in release.metrics["saes"].values() if q["layer"] == 0)
    sae = FORMATS["llama_scope_safetensors"].read(sae_dir / q["folder"])
    chunks = torch.randint(0, FAST_TRAINED["vocab_size"], (5, 12), generator=torch.Generator().manual_seed(1))
    got = attention_received(model, sae, 0, chunks, batch=2).set_index("feature")

    with torch.no_grad():
        out = model(input_ids=chunks, output_attentions=True, output_hidden_states=True)
    on = sae_activations(out.hidden_states[1], sae) > 0  # hidden_states[1]: resid_post of block 0
    probs = out.attentions[1]  # (chunk, head, query, key)
    for f in [int(i) for i in torch.nonzero(on[:, 1:].any(0).any(0)).flatten()[:12]]:
        received = torch.zeros(probs.shape[1], dtype=torch.float64)
        uniform = 0.0
        for c in range(chunks.shape[0]):
            for key in range(1, chunks.shape[1]):
                if on[c, key, f]:
                    received += probs[c, :, key:, key].double().sum(-1)
                    uniform += sum(1 / (query + 1) for query in range(key, chunks.shape[1]))
        expected = float(torch.log((received / uniform).mean()))
        assert got.loc[f, "attention_log_ratio"] == pytest.approx(expected, rel=1e-5), f
        assert got.loc[f, "firing_keys"] == int(on[:, 1:, f].sum())
    last = model.config.num_hidden_layers - 1  # no block reads the last layer's resid_post
    assert attention_received(model, sae, last, chunks)["attention_log_ratio"].isna().all()


def test_regenerating_with_other_parameters_leaves_no_folder_of_the_last_run(tmp_path):
    """Gemma Scope folder names carry the L0: a regeneration into the same cache must list only its own SAEs."""
    from core.weights.discovery import discover_saes
    from core.weights.hub import Hub

    tiny = {**FAST_TRAINED, "steps": 2}
    first = generate("trained-gemma", tmp_path, overrides=tiny)
    second = generate("trained-gemma", tmp_path, overrides={**tiny, "sae_steps": 20})
    folders = [{q["folder"] for q in run.metrics["saes"].values()} for run in (first, second)]
    assert folders[0] != folders[1]  # other L0s, other folder names: the case this test is about
    found = {ref.folder for ref in discover_saes("trained-gemma", Hub(cache_dir=tmp_path, offline=True)).saes}
    assert found == folders[1]
