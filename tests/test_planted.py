"""core.planted: real formats, loadable by transformers, deterministic, planted truth holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from huggingface_hub import hf_hub_download, snapshot_download
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from core.hub_cache import repo_cache_dir
from core.planted import PlantedTruth, generate, main

RELEASES = ("planted-gemma", "planted-llama")


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hub")


@pytest.fixture(scope="session")
def truths(cache: Path) -> dict[str, PlantedTruth]:
    return {rid: generate(rid, cache) for rid in RELEASES}


def _snap(cache: Path, repo: str) -> Path:
    return Path(snapshot_download(repo, cache_dir=cache, local_files_only=True))


def _state(cache: Path, t: PlantedTruth) -> dict[str, np.ndarray]:
    state: dict[str, np.ndarray] = {}
    for f in sorted(_snap(cache, t.model_repo).glob("model-*.safetensors")):
        state.update({k: v.float().numpy() for k, v in load_file(f).items()})
    return state


def _gain(state: dict[str, np.ndarray], name: str, arch: str) -> np.ndarray:
    return 1 + state[name] if arch == "gemma2" else state[name]


def _sae(cache: Path, t: PlantedTruth, folder: str) -> tuple[np.ndarray, np.ndarray]:
    """(W_enc (d_model, d_sae), W_dec (d_sae, d_model)) as float32."""
    if t.data["architecture"] == "gemma2":
        path = hf_hub_download(t.sae_repo, f"{folder}/params.npz", cache_dir=cache,
                               local_files_only=True)
        with np.load(path, allow_pickle=False) as z:
            return z["W_enc"], z["W_dec"]
    path = hf_hub_download(t.sae_repo, f"{folder}/checkpoints/final.safetensors", cache_dir=cache,
                           local_files_only=True)
    w = load_file(path)
    return w["encoder.weight"].float().numpy().T, w["decoder.weight"].float().numpy().T


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("rid", RELEASES)
def test_transformers_loads_the_model(cache: Path, truths: dict[str, PlantedTruth],
                                      rid: str) -> None:
    t = truths[rid]
    snap = _snap(cache, t.model_repo)
    shards = sorted(p.name for p in snap.glob("model-*.safetensors"))
    assert len(shards) >= 2 and shards[0].startswith("model-00001-of-0000")
    index = json.loads((snap / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    config = AutoConfig.from_pretrained(snap)
    by_id = AutoConfig.from_pretrained(t.model_repo, cache_dir=cache, local_files_only=True)
    assert by_id.to_dict() | {"_name_or_path": ""} == config.to_dict() | {"_name_or_path": ""}
    model = AutoModelForCausalLM.from_pretrained(snap)
    p = t.data["params"]
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads,
            config.head_dim) == (p["d_model"], p["n_layers"], p["n_kv_heads"], p["head_dim"])
    if rid == "planted-gemma":
        assert type(model).__name__ == "Gemma2ForCausalLM" and model.dtype == torch.float32
        assert config.tie_word_embeddings and config.query_pre_attn_scalar == 24 != config.head_dim
        assert (config.attn_logit_softcapping, config.final_logit_softcapping) == (50.0, 30.0)
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    else:
        assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.bfloat16
        assert not config.tie_word_embeddings
        assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    tok = AutoTokenizer.from_pretrained(snap)
    assert len(tok) == config.vocab_size == 16384  # the first 16384 GPT-2 tokens: a complete BPE tokenizer
    text = " The runner was running home"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert len(tok(" running")["input_ids"]) == 1
    with torch.no_grad():
        logits = model(**tok(text, return_tensors="pt")).logits
    assert torch.isfinite(logits).all()


def test_gemma_scope_npz(cache: Path, truths: dict[str, PlantedTruth]) -> None:
    t = truths["planted-gemma"]
    p = t.data["params"]
    assert set(t.data["saes"]) == {f"layer_{i}/width_512/average_l0_32"
                                   for i in range(p["n_layers"])}
    path = hf_hub_download(t.sae_repo, "layer_3/width_512/average_l0_32/params.npz",
                           cache_dir=cache, local_files_only=True)
    with np.load(path, allow_pickle=False) as z:
        shapes = {k: (z[k].shape, z[k].dtype) for k in z.files}
        w_dec, threshold = z["W_dec"], z["threshold"]
    d, n, f32 = p["d_model"], p["d_sae"], np.dtype(np.float32)
    assert shapes == {"W_enc": ((d, n), f32), "W_dec": ((n, d), f32), "b_enc": ((n,), f32),
                      "b_dec": ((d,), f32), "threshold": ((n,), f32)}
    np.testing.assert_allclose(np.linalg.norm(w_dec, axis=1), 1.0, atol=1e-5)
    assert (threshold > 0).all()


def test_llama_scope_safetensors(cache: Path, truths: dict[str, PlantedTruth]) -> None:
    t = truths["planted-llama"]
    p = t.data["params"]
    folder = "Llama-tiny-L5R-8x"
    w = load_file(hf_hub_download(t.sae_repo, f"{folder}/checkpoints/final.safetensors",
                                  cache_dir=cache, local_files_only=True))
    d, n = p["d_model"], p["d_sae"]
    assert {k: (tuple(v.shape), v.dtype) for k, v in w.items()} == {
        "encoder.weight": ((n, d), torch.bfloat16), "encoder.bias": ((n,), torch.bfloat16),
        "decoder.weight": ((d, n), torch.bfloat16), "decoder.bias": ((d,), torch.bfloat16)}
    hyper = json.loads(Path(hf_hub_download(t.sae_repo, f"{folder}/hyperparams.json",
                                            cache_dir=cache, local_files_only=True)).read_text())
    assert hyper["hook_point_in"] == hyper["hook_point_out"] == "blocks.5.hook_resid_post"
    assert (hyper["d_model"], hyper["d_sae"], hyper["expansion_factor"]) == (d, n, 8)
    assert hyper["act_fn"] == "jumprelu" and hyper["norm_activation"] == "dataset-wise"
    assert hyper["jump_relu_threshold"] > 0 and hyper["top_k"] == 50
    norms = hyper["dataset_average_activation_norm"]
    assert norms["in"] == norms["out"] > 0
    assert hyper["sparsity_include_decoder_norm"] and hyper["use_decoder_bias"]
    assert not hyper["apply_decoder_bias_to_pre_encoder"]
    dec_norm = w["decoder.weight"].float().norm(dim=0).numpy()
    sem = [f["index"] for f in t.data["saes"]["l5r_8x"]["semantic_features"]]
    non = np.setdiff1d(np.arange(n), sem)
    assert np.abs(dec_norm - 1).max() > 0.1  # not unit norm
    assert dec_norm[sem].mean() / dec_norm[non].mean() == pytest.approx(p["semantic_decoder_ratio"],
                                                                       rel=0.05)


@pytest.mark.parametrize("rid", RELEASES)
def test_planted_features_are_recoverable_from_weights(cache: Path, truths: dict[str, PlantedTruth],
                                                       rid: str) -> None:
    t = truths[rid]
    arch, p = t.data["architecture"], t.data["params"]
    state = _state(cache, t)
    w_e = state["model.embed_tokens.weight"]
    w_u = state.get("lm_head.weight", w_e)
    final_gain = _gain(state, "model.norm.weight", arch)
    groups = [g["token_ids"] for g in t.data["token_groups"]]
    group_of = np.full(len(w_u), -1)
    for gid, ids in enumerate(groups):
        group_of[ids] = gid
    members = w_e[groups[0]]
    assert (_unit(members) @ _unit(members).T)[np.triu_indices(len(members), 1)].mean() > 0.3
    assert t.data["semantic_fraction"] == round(p["semantic_fraction"] * p["d_sae"]) / p["d_sae"]
    saes = list(t.data["saes"].values())
    for sae in (saes[0], saes[-1]):
        w_enc, w_dec = _sae(cache, t, sae["folder"])
        sem = {f["index"]: f for f in sae["semantic_features"]}
        assert len(sem) == round(p["semantic_fraction"] * p["d_sae"])
        x = final_gain * w_dec / np.sqrt((w_dec**2).mean(axis=1, keepdims=True))
        top = torch.from_numpy(x @ w_u.T).topk(10, dim=1).indices.numpy()
        top_group = group_of[top]
        for i, f in sem.items():  # the output group fills the top min(10, |group|) tokens
            g = f["output_group"]
            assert (top_group[i, :min(10, len(groups[g]))] == g).mean() >= 0.8
        # random directions: no group dominates the top 10 (count of the most frequent group)
        same = (top_group[:, :, None] == top_group[:, None, :]) & (top_group[:, :, None] >= 0)
        non = np.setdiff1d(np.arange(p["d_sae"]), list(sem))
        assert same.sum(axis=2).max(axis=1)[non].max() <= 3
        # encoders read their input group's embedding centre; semantic ones are larger
        centres = _unit(np.stack([w_e[ids].mean(axis=0) for ids in groups]))
        cos = _unit(w_enc.T) @ centres.T
        idx = np.array(sorted(sem))
        assert cos[idx, [sem[i]["input_group"] for i in idx]].min() > 0.6
        assert np.abs(cos[non]).max() < 0.5
        enc_norm = np.linalg.norm(w_enc, axis=0)
        assert enc_norm[idx].mean() / enc_norm[non].mean() == pytest.approx(
            p["semantic_encoder_ratio"], rel=0.05)
        assert enc_norm[idx[0]] == pytest.approx(sem[idx[0]]["encoder_norm"], rel=1e-2)


@pytest.mark.parametrize("rid", RELEASES)
def test_attention_depth_profiles_are_recoverable(cache: Path, truths: dict[str, PlantedTruth],
                                                  rid: str) -> None:
    t = truths[rid]
    arch, p, attn = t.data["architecture"], t.data["params"], t.data["attention"]
    state = _state(cache, t)
    w_e = state["model.embed_tokens.weight"]
    w_u = state.get("lm_head.weight", w_e)
    groups = [g["token_ids"] for g in t.data["token_groups"]]
    c_in = _unit(np.stack([w_e[ids].mean(axis=0) for ids in groups]))
    c_out = _unit(np.stack([w_u[ids].mean(axis=0) for ids in groups]))
    saes = {s["layer"]: s for s in t.data["saes"].values()}
    hd, n_heads = p["head_dim"], p["n_heads"]
    enc_est = np.zeros((p["n_layers"], n_heads))
    dec_est = np.zeros((p["n_layers"], n_heads))
    for layer in range(p["n_layers"]):
        pre = f"model.layers.{layer}."
        g = _gain(state, pre + "input_layernorm.weight", arch)
        q = state[pre + "self_attn.q_proj.weight"] * g
        k = state[pre + "self_attn.k_proj.weight"] * g
        v = state[pre + "self_attn.v_proj.weight"] * g
        o = state[pre + "self_attn.o_proj.weight"]
        w_enc, w_dec = _sae(cache, t, saes[layer]["folder"])
        sem = {f["index"]: f for f in saes[layer]["semantic_features"]}
        for h in range(n_heads):
            kv = attn["query_head_to_kv_head"][h]
            feats = attn["features_per_kv_head"][str(layer)][kv]
            qk = q[h * hd:(h + 1) * hd].T @ k[kv * hd:(kv + 1) * hd]  # (d, d) bilinear form
            ov = o[:, h * hd:(h + 1) * hd] @ v[kv * hd:(kv + 1) * hd]
            e = _unit(w_enc[:, feats].T)
            dd = _unit(w_dec[feats])
            a = c_in[[sem[f]["input_group"] for f in feats]]
            u = c_out[[sem[f]["output_group"] for f in feats]]
            enc_est[layer, h] = np.einsum("fi,ij,fj->f", a, qk, e).mean()
            dec_est[layer, h] = np.einsum("fi,ij,fj->f", u, ov, dd).mean()
    for est, phase in ((enc_est, "encoder_embedding"), (dec_est, "decoder_unembedding")):
        truth = np.array(attn[phase]["strength"])
        assert np.corrcoef(est.ravel(), truth.ravel())[0, 1] > 0.95
        depth = est.mean(axis=1)
        ends, middle = depth[[0, -1]].mean(), depth[len(depth) // 2]
        assert (ends > middle) == (attn[phase]["shape"] == "U")
    assert attn["encoder_embedding"]["shape"] != attn["decoder_unembedding"]["shape"]


def test_layers_subset_and_determinism(cache: Path, truths: dict[str, PlantedTruth],
                                       tmp_path: Path) -> None:
    t = truths["planted-gemma"]
    sub = generate("planted-gemma", tmp_path, layers=[2])
    assert sub.model_commit == t.model_commit  # byte-identical model repo
    assert list(sub.data["saes"]) == ["layer_2/width_512/average_l0_32"]
    name = "layer_2/width_512/average_l0_32/params.npz"
    a = hf_hub_download(t.sae_repo, name, cache_dir=cache, local_files_only=True)
    b = hf_hub_download(t.sae_repo, name, cache_dir=tmp_path, local_files_only=True)
    assert Path(a).read_bytes() == Path(b).read_bytes()
    # the CLI regenerates the same bytes: same commits, no new revision
    main(["--cache-dir", str(cache), "planted-gemma"])
    for repo, sha in ((t.model_repo, t.model_commit), (t.sae_repo, t.sae_commit)):
        assert (repo_cache_dir(cache, repo) / "refs" / "main").read_text() == sha
        assert [s.name for s in (repo_cache_dir(cache, repo) / "snapshots").iterdir()] == [sha]
    with pytest.raises(SystemExit):
        main(["--cache-dir", str(tmp_path), "gemma-scope-2b-pt-res"])


def test_truth_json_is_in_the_sae_repo(cache: Path, truths: dict[str, PlantedTruth]) -> None:
    t = truths["planted-llama"]
    data: dict[str, Any] = json.loads(Path(hf_hub_download(
        t.sae_repo, "planted_truth.json", cache_dir=cache, local_files_only=True)).read_text())
    assert data == json.loads(json.dumps(t.data))
    assert data["format_version"] == 1 and data["release_id"] == "planted-llama"
    assert data["model_commit"] == t.model_commit
    assert {"encoder_embedding", "decoder_unembedding"} <= data["attention"].keys()
    assert all(6 <= len(g["token_ids"]) <= 12 for g in data["token_groups"])
    strength = np.array(data["attention"]["decoder_unembedding"]["strength"])
    assert strength.shape == (data["params"]["n_layers"], data["params"]["n_heads"])
