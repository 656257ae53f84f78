"""core.testbeds.planted: real formats, loadable by transformers, deterministic, planted truth holds.

Also the reference z-profile helper (``z_profiles``; run ``python -m tests.test_planted`` to print the profiles of
every planted release): per (direction, circuit, query head h) the value of the circuit, z-scored robustly against
``N_NULL`` (128) isotropic random unit directions through the same circuit, ``z = (value - median_null) /
(1.4826 * MAD_null)``. With c = h // (n_heads / n_kv_heads), n_l(x) = x / sqrt(mean(x^2) + eps) * g_in(l),
top10 = mean of the 10 largest values over the vocabulary t, sigma = sqrt(d_model) on Gemma else 1, s_attn =
query_pre_attn_scalar^-0.5 on Gemma, head_dim^-0.5 on Llama, softcap_attn(x) = 50 tanh(x / 50) on Gemma-2 (identity
otherwise), Gemma 3's q_norm / k_norm applied to the head vectors, and W_U = lm_head rows (= embed_tokens, tied):

* encoder phase of SAE L (writer layer L), ``ov_writer``: top10_t ehat . Post_L(W_O^h W_V^c n_L(sigma W_E[t])),
  Post_L(o) = (1 + post_attention_layernorm.weight) * o / sqrt(mean(o^2) + eps) on Gemma, the identity on Llama;
* decoder phase of SAE L (reader layer L+1; none for the last SAE): ``qk_feature_key`` top10_t softcap_attn(s_attn
  (W_Q^h n(W_U[t])) . (W_K^c n(dhat))), ``qk_feature_query`` top10_t softcap_attn(s_attn (W_Q^h n(dhat)) .
  (W_K^c n(W_U[t]))), ``ov_write_norm`` ||W_O^h W_V^c n(dhat)||; the per-head score is the mean of the three z's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from huggingface_hub import hf_hub_download, snapshot_download
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from core.testbeds.planted import PlantedTruth, generate, main
from core.weights.hub_cache import repo_cache_dir

pytestmark = pytest.mark.chain

RELEASES = ("planted-gemma", "planted-llama")
NULL_RELEASES = {"planted-gemma-null": "planted-gemma", "planted-llama-null": "planted-llama"}
N_NULL = 128


# ---------------------------------------------------------------------------------------------------- z helper
def load_model(cache: Path, repo: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json, float32 state dict) of a model repo in the hub cache."""
    snap = Path(snapshot_download(repo, cache_dir=cache, local_files_only=True))
    state: dict[str, torch.Tensor] = {}
    for f in sorted(snap.glob("model-*.safetensors")):
        state.update({k: v.float() for k, v in load_file(f).items()})
    return json.loads((snap / "config.json").read_text()), state


def load_sae(cache: Path, t: PlantedTruth, folder: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit encoder directions, unit decoder directions) as rows (d_sae, d_model), float32, in any format."""
    arch = t.data["architecture"]
    if arch == "gemma2":
        path = hf_hub_download(t.sae_repo, f"{folder}/params.npz", cache_dir=cache, local_files_only=True)
        with np.load(path, allow_pickle=False) as z:
            w_enc, w_dec = torch.from_numpy(z["W_enc"]).T, torch.from_numpy(z["W_dec"])
    elif arch == "gemma3":
        w = load_file(
            hf_hub_download(t.sae_repo, f"{folder}/params.safetensors", cache_dir=cache, local_files_only=True)
        )
        w_enc, w_dec = w["w_enc"].T, w["w_dec"]
    else:
        w = load_file(
            hf_hub_download(
                t.sae_repo, f"{folder}/checkpoints/final.safetensors", cache_dir=cache, local_files_only=True
            )
        )
        w_enc, w_dec = w["encoder.weight"], w["decoder.weight"].T
    return _unit_t(w_enc.float()), _unit_t(w_dec.float())


def _unit_t(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


class Circuits:
    """The circuit values of the module docstring, computed directly from a model's weights (float32)."""

    def __init__(self, config: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
        self.config, self.state = config, state
        model_type = config["model_type"]
        self.gemma, self.gemma3 = model_type.startswith("gemma"), model_type.startswith("gemma3")
        self.d, self.hd = config["hidden_size"], config["head_dim"]
        self.n_heads, self.n_kv = config["num_attention_heads"], config["num_key_value_heads"]
        self.n_layers, self.eps = config["num_hidden_layers"], config["rms_norm_eps"]
        self.sigma = math.sqrt(self.d) if self.gemma else 1.0
        self.s_attn = (config["query_pre_attn_scalar"] if self.gemma else self.hd) ** -0.5
        self.cap = config.get("attn_logit_softcapping") if model_type == "gemma2" else None
        self.w_e = state["model.embed_tokens.weight"]
        self.w_u = state.get("lm_head.weight", self.w_e)

    def gain(self, name: str) -> torch.Tensor:
        return 1 + self.state[name] if self.gemma else self.state[name]

    def n(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        g = self.gain(f"model.layers.{layer}.input_layernorm.weight")
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + self.eps) * g

    def head_norm(self, y: torch.Tensor, layer: int, which: str) -> torch.Tensor:
        if not self.gemma3:
            return y
        g = self.gain(f"model.layers.{layer}.self_attn.{which}_norm.weight")
        return y * torch.rsqrt(y.pow(2).mean(1, keepdim=True) + self.eps) * g

    def head(self, layer: int, h: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W_Q^h, W_K^c, W_V^c (head_dim, d_model), W_O^h (d_model, head_dim))."""
        pre, hd, c = f"model.layers.{layer}.self_attn.", self.hd, h // (self.n_heads // self.n_kv)
        return (
            self.state[pre + "q_proj.weight"][h * hd : (h + 1) * hd],
            self.state[pre + "k_proj.weight"][c * hd : (c + 1) * hd],
            self.state[pre + "v_proj.weight"][c * hd : (c + 1) * hd],
            self.state[pre + "o_proj.weight"][:, h * hd : (h + 1) * hd],
        )

    def _top10(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.topk(10, dim=1).values.mean(1)

    def ov_writer(self, dirs: torch.Tensor, layer: int, h: int) -> torch.Tensor:
        _, _, v, o = self.head(layer, h)
        out = self.n(self.sigma * self.w_e, layer) @ v.T @ o.T  # (vocab, d_model)
        if self.gemma:
            g_post = self.gain(f"model.layers.{layer}.post_attention_layernorm.weight")
            out = g_post * out * torch.rsqrt(out.pow(2).mean(1, keepdim=True) + self.eps)
        return self._top10(dirs @ out.T)

    def _cap(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.cap is None else self.cap * torch.tanh(x / self.cap)

    def qk_feature_key(self, dirs: torch.Tensor, layer: int, h: int) -> torch.Tensor:
        q, k, _, _ = self.head(layer, h)
        tokens = self.head_norm(self.n(self.w_u, layer) @ q.T, layer, "q")
        feats = self.head_norm(self.n(dirs, layer) @ k.T, layer, "k")
        return self._top10(self._cap(self.s_attn * feats @ tokens.T))

    def qk_feature_query(self, dirs: torch.Tensor, layer: int, h: int) -> torch.Tensor:
        q, k, _, _ = self.head(layer, h)
        feats = self.head_norm(self.n(dirs, layer) @ q.T, layer, "q")
        tokens = self.head_norm(self.n(self.w_u, layer) @ k.T, layer, "k")
        return self._top10(self._cap(self.s_attn * feats @ tokens.T))

    def ov_write_norm(self, dirs: torch.Tensor, layer: int, h: int) -> torch.Tensor:
        _, _, v, o = self.head(layer, h)
        return (self.n(dirs, layer) @ v.T @ o.T).norm(dim=1)


def robust_z(values: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
    median = null.median()
    return (values - median) / (1.4826 * (null - median).abs().median())


def null_directions(d: int, seed: int, n: int = N_NULL) -> torch.Tensor:
    return _unit_t(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)))


def phase_z(circ: Circuits, dirs: torch.Tensor, phase: str, sae_layer: int) -> torch.Tensor | None:
    """(n_dirs, n_heads) z of ``dirs`` in ``phase`` for the SAE at ``sae_layer`` (None: the last SAE has no
    reader)."""
    null = null_directions(circ.d, 1000 * sae_layer + (phase == "decoder_unembedding"))
    if phase == "encoder_embedding":
        kinds, layer = (circ.ov_writer,), sae_layer
    elif sae_layer + 1 < circ.n_layers:
        kinds, layer = (circ.qk_feature_key, circ.qk_feature_query, circ.ov_write_norm), sae_layer + 1
    else:
        return None
    return torch.stack(
        [
            torch.stack([robust_z(f(dirs, layer, h), f(null, layer, h)) for f in kinds]).mean(0)
            for h in range(circ.n_heads)
        ],
        1,
    )


# phase -> (the SAE truth's list of planted attention features, 0 = encoder / 1 = decoder directions)
PHASES = {
    "encoder_embedding": ("attention_encoder_features", 0),
    "decoder_unembedding": ("attention_decoder_features", 1),
}


def z_profiles(cache: Path, t: PlantedTruth) -> dict[str, dict[str, np.ndarray]]:
    """Per phase, over its SAE layers: ``attn`` (mean z over the SAE's planted attention features and heads),
    ``all`` (over every feature and head), ``heads`` ((layers, n_heads) mean z of the attention features)."""
    config, state = load_model(cache, t.model_repo)
    circ = Circuits(config, state)
    out: dict[str, dict[str, list]] = {ph: {"attn": [], "all": [], "heads": []} for ph in PHASES}
    for sae in sorted(t.data["saes"].values(), key=lambda s: s["layer"]):
        dirs = load_sae(cache, t, sae["folder"])
        for phase, (key, which) in PHASES.items():
            z = phase_z(circ, dirs[which], phase, sae["layer"])
            if z is None:
                continue
            feats = sae[key]
            out[phase]["all"].append(z.mean().item())
            out[phase]["attn"].append(z[feats].mean().item() if feats else math.nan)
            out[phase]["heads"].append(z[feats].mean(0).tolist() if feats else [math.nan] * circ.n_heads)
    return {ph: {k: np.array(v) for k, v in d.items()} for ph, d in out.items()}


def _shape_ok(values: np.ndarray, shape: str) -> bool:
    """U: both ends above the middle third; inverted-U: below; flat: no end-middle gap beyond 25 % of the mean."""
    n = len(values)
    ends, middle = values[[0, -1]].mean(), values[n // 3 : n - n // 3].mean()
    if shape == "U":
        return ends > 2 * middle
    if shape == "inverted-U":
        return middle > 2 * ends
    return abs(ends - middle) < 0.25 * values.mean()


# -------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hub")


@pytest.fixture(scope="session")
def truths(cache: Path) -> dict[str, PlantedTruth]:
    return {rid: generate(rid, cache) for rid in (*RELEASES, *NULL_RELEASES)}


@pytest.fixture(scope="session")
def profiles(cache: Path, truths: dict[str, PlantedTruth]) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    return {rid: z_profiles(cache, t) for rid, t in truths.items()}


def _snap(cache: Path, repo: str) -> Path:
    return Path(snapshot_download(repo, cache_dir=cache, local_files_only=True))


def _state(cache: Path, t: PlantedTruth) -> dict[str, np.ndarray]:
    state: dict[str, np.ndarray] = {}
    for f in sorted(_snap(cache, t.model_repo).glob("model-*.safetensors")):
        state.update({k: v.float().numpy() for k, v in load_file(f).items()})
    return state


def _gain(state: dict[str, np.ndarray], name: str, arch: str) -> np.ndarray:
    return 1 + state[name] if arch in ("gemma2", "gemma3") else state[name]


def _sae(cache: Path, t: PlantedTruth, folder: str) -> tuple[np.ndarray, np.ndarray]:
    """(W_enc (d_model, d_sae), W_dec (d_sae, d_model)) as float32."""
    if t.data["architecture"] == "gemma2":
        path = hf_hub_download(t.sae_repo, f"{folder}/params.npz", cache_dir=cache, local_files_only=True)
        with np.load(path, allow_pickle=False) as z:
            return z["W_enc"], z["W_dec"]
    path = hf_hub_download(
        t.sae_repo, f"{folder}/checkpoints/final.safetensors", cache_dir=cache, local_files_only=True
    )
    w = load_file(path)
    return w["encoder.weight"].float().numpy().T, w["decoder.weight"].float().numpy().T


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("rid", RELEASES)
def test_transformers_loads_the_model(cache: Path, truths: dict[str, PlantedTruth], rid: str) -> None:
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
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads, config.head_dim) == (
        p["d_model"],
        p["n_layers"],
        p["n_kv_heads"],
        p["head_dim"],
    )
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
    assert set(t.data["saes"]) == {f"layer_{i}/width_512/average_l0_32" for i in range(p["n_layers"])}
    path = hf_hub_download(
        t.sae_repo, "layer_3/width_512/average_l0_32/params.npz", cache_dir=cache, local_files_only=True
    )
    with np.load(path, allow_pickle=False) as z:
        shapes = {k: (z[k].shape, z[k].dtype) for k in z.files}
        w_dec, threshold = z["W_dec"], z["threshold"]
    d, n, f32 = p["d_model"], p["d_sae"], np.dtype(np.float32)
    assert shapes == {
        "W_enc": ((d, n), f32),
        "W_dec": ((n, d), f32),
        "b_enc": ((n,), f32),
        "b_dec": ((d,), f32),
        "threshold": ((n,), f32),
    }
    np.testing.assert_allclose(np.linalg.norm(w_dec, axis=1), 1.0, atol=1e-5)
    assert (threshold > 0).all()


def test_llama_scope_safetensors(cache: Path, truths: dict[str, PlantedTruth]) -> None:
    t = truths["planted-llama"]
    p = t.data["params"]
    folder = "Llama-tiny-L5R-8x"
    w = load_file(
        hf_hub_download(t.sae_repo, f"{folder}/checkpoints/final.safetensors", cache_dir=cache, local_files_only=True)
    )
    d, n = p["d_model"], p["d_sae"]
    assert {k: (tuple(v.shape), v.dtype) for k, v in w.items()} == {
        "encoder.weight": ((n, d), torch.bfloat16),
        "encoder.bias": ((n,), torch.bfloat16),
        "decoder.weight": ((d, n), torch.bfloat16),
        "decoder.bias": ((d,), torch.bfloat16),
    }
    hyper = json.loads(
        Path(
            hf_hub_download(t.sae_repo, f"{folder}/hyperparams.json", cache_dir=cache, local_files_only=True)
        ).read_text()
    )
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
    assert dec_norm[sem].mean() / dec_norm[non].mean() == pytest.approx(p["semantic_decoder_ratio"], rel=0.05)


@pytest.mark.parametrize("rid", RELEASES)
def test_planted_features_are_recoverable_from_weights(cache: Path, truths: dict[str, PlantedTruth], rid: str) -> None:
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
            assert (top_group[i, : min(10, len(groups[g]))] == g).mean() >= 0.8
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
        assert enc_norm[idx].mean() / enc_norm[non].mean() == pytest.approx(p["semantic_encoder_ratio"], rel=0.05)
        assert enc_norm[idx[0]] == pytest.approx(sem[idx[0]]["encoder_norm"], rel=1e-2)


def _amplitude(rows: np.ndarray, planted: np.ndarray) -> np.ndarray:
    """Per row ``s_hat = (row . p) / |row - (row . p) p|``: the planted amplitude over the background norm."""
    a = np.einsum("ij,ij->i", rows, planted)
    return a / np.linalg.norm(rows - a[:, None] * planted, axis=1)


@pytest.mark.parametrize("rid", RELEASES)
def test_layer_l_carries_sae_l_minus_1_decoders_and_sae_l_encoders(
    cache: Path, truths: dict[str, PlantedTruth], rid: str
) -> None:
    """Weights: layer l's reader rows are SAE l-1's decoder directions (K, V) and the output groups' unembedding
    centres (Q, O); its writer rows read the input groups' embedding centres (V) and write SAE l's encoder
    directions (O); each with the planted amplitude over a background of norm ``background``."""
    t = truths[rid]
    arch, p, attn = t.data["architecture"], t.data["params"], t.data["attention"]
    state = _state(cache, t)
    w_e = state["model.embed_tokens.weight"]
    w_u = state.get("lm_head.weight", w_e)
    groups = [g["token_ids"] for g in t.data["token_groups"]]
    c_in = _unit(np.stack([w_e[ids].mean(axis=0) for ids in groups]))
    c_out = _unit(np.stack([w_u[ids].mean(axis=0) for ids in groups]))
    saes = {s["layer"]: s for s in t.data["saes"].values()}
    dirs = {layer: _sae(cache, t, s["folder"]) for layer, s in saes.items()}
    hd, r, bg = p["head_dim"], p["attn_rank"], attn["background"]
    per_kv = p["n_heads"] // p["n_kv_heads"]
    est: dict[str, list[float]] = {k: [] for k in ("k", "v", "q", "o", "wv", "wo")}
    want: dict[str, list[float]] = {k: [] for k in est}
    for layer in range(p["n_layers"]):
        pre = f"model.layers.{layer}.self_attn."
        g = _gain(state, f"model.layers.{layer}.input_layernorm.weight", arch)
        q, k, v = (state[pre + f"{m}_proj.weight"] * g for m in "qkv")
        o = state[pre + "o_proj.weight"]
        rows = attn["rows"][str(layer)]
        assert (rows["decoder_readers"] is None) == (layer == 0)
        for kv in range(p["n_kv_heads"]):
            heads = range(kv * per_kv, (kv + 1) * per_kv)
            if layer:
                reader = rows["decoder_readers"]
                assert reader["sae_layer"] == layer - 1
                feats, grp = reader["features_per_kv_head"][kv], reader["output_groups_per_kv_head"][kv]
                assert set(feats) <= {f["index"] for f in saes[layer - 1]["semantic_features"]}
                dhat = _unit(dirs[layer - 1][1][feats])  # SAE l-1's decoder directions
                s = np.array(attn["decoder_unembedding"]["strength"][layer - 1])
                for name, block in (("k", k), ("v", v)):
                    est[name].append(_amplitude(block[kv * hd : kv * hd + r] / bg, dhat).mean())
                    want[name].append(s[list(heads)].mean())
                for h in heads:
                    est["q"].append(_amplitude(q[h * hd : h * hd + r] / bg, c_out[grp]).mean())
                    est["o"].append(_amplitude(o[:, h * hd : h * hd + r].T / bg, c_out[grp]).mean())
                    want["q"].append(s[h])
                    want["o"].append(s[h])
            writer = rows["encoder_writers"]
            assert writer["sae_layer"] == layer
            feats, grp = writer["features_per_kv_head"][kv], writer["input_groups_per_kv_head"][kv]
            ehat = _unit(dirs[layer][0].T[feats])  # SAE l's encoder directions
            s = np.array(attn["encoder_embedding"]["strength"][layer])
            est["wv"].append(_amplitude(v[kv * hd + r : kv * hd + 2 * r] / bg, c_in[grp]).mean())
            want["wv"].append(s[list(heads)].mean())
            for h in heads:
                est["wo"].append(_amplitude(o[:, h * hd + r : h * hd + 2 * r].T / bg, ehat).mean())
                want["wo"].append(s[h])
    for name in est:  # amplitude recovered (group centres from token means are ~6 % off their planted centre)
        np.testing.assert_allclose(est[name], want[name], rtol=0.2, atol=0.08, err_msg=name)
        assert np.corrcoef(est[name], want[name])[0, 1] > 0.95, name
    # the per-SAE lists name the same features
    for layer, sae in saes.items():
        readers = attn["rows"].get(str(layer + 1), {}).get("decoder_readers")
        assert sae["attention_decoder_features"] == (
            sorted(sum(readers["features_per_kv_head"], [])) if readers else []
        )
        assert sae["attention_encoder_features"] == sorted(
            sum(attn["rows"][str(layer)]["encoder_writers"]["features_per_kv_head"], [])
        )
        assert len(sae["attention_encoder_features"]) == p["n_kv_heads"] * r
    assert saes[p["n_layers"] - 1]["attention_decoder_features"] == []  # the last SAE has no reader


@pytest.mark.parametrize("rid", RELEASES)
def test_z_profiles_recover_the_planted_shapes(
    profiles: dict[str, Any], truths: dict[str, PlantedTruth], rid: str
) -> None:
    """The robust z (module doc) of the planted attention features follows the planted strength over SAE layers,
    monotone and unsaturated, in both phases; the shapes are read from the weights, not assumed."""
    attn = truths[rid].data["attention"]
    for phase in PHASES:
        z, s = profiles[rid][phase]["attn"], np.array(attn[phase]["strength"]).mean(1)
        assert len(z) == len(s) == len(attn[phase]["layers"])
        assert np.corrcoef(z, s)[0, 1] > 0.9, (phase, z, s)
        assert _shape_ok(z, attn[phase]["shape"]), (phase, z)
        assert z.min() < 2 and 5 < z.max() < 20, (phase, z)  # a range, not saturated
        heads = profiles[rid][phase]["heads"]
        assert heads.mean(0)[0] > heads.mean(0)[-1], heads  # head_scale: head 0 strongest
        assert profiles[rid][phase]["all"].max() > 0.1  # the features lift the all-feature mean too


@pytest.mark.parametrize("rid", NULL_RELEASES)
def test_null_release_z_is_zero_at_every_layer(
    profiles: dict[str, Any], truths: dict[str, PlantedTruth], rid: str
) -> None:
    """Random SAE directions through the parent's model: z ~ 0 whatever the layer and the parent's planted (and
    model-only) depth profiles, while the parent's planted features stand out through the same circuits."""
    parent = NULL_RELEASES[rid]
    for phase in PHASES:
        z = profiles[rid][phase]["all"]
        assert np.abs(z).max() < 0.5, (phase, z)
        assert np.isnan(profiles[rid][phase]["attn"]).all()  # no planted attention feature
        assert profiles[parent][phase]["attn"].max() > 10 * np.abs(z).max()


@pytest.mark.parametrize("rid", NULL_RELEASES)
def test_null_release_same_model_random_saes(cache: Path, truths: dict[str, PlantedTruth], rid: str) -> None:
    t, parent = truths[rid], truths[NULL_RELEASES[rid]]
    assert (t.model_repo, t.model_commit) == (parent.model_repo, parent.model_commit)  # byte-identical model
    assert t.sae_repo == parent.sae_repo + "-null" and t.sae_commit != parent.sae_commit
    assert t.data["null_sae"] and t.data["planted_features"].startswith("none")
    assert t.data["semantic_fraction"] == 0.0
    assert {k: v for k, v in t.data["params"].items() if k != "null_sae"} == {
        k: v for k, v in parent.data["params"].items() if k != "null_sae"
    }
    for phase in PHASES:
        assert t.data["attention"][phase]["shape"] == "none"
        assert not np.any(t.data["attention"][phase]["strength"])
        assert (
            t.data["attention"]["model_only"]["feature_rows"][phase]["strength"]
            == (parent.data["attention"][phase]["strength"])
        )
    state = _state(cache, t)
    w_e = state["model.embed_tokens.weight"]
    w_u = state.get("lm_head.weight", w_e)
    final_gain = _gain(state, "model.norm.weight", t.data["architecture"])
    groups = [g["token_ids"] for g in t.data["token_groups"]]
    c_in = _unit(np.stack([w_e[ids].mean(axis=0) for ids in groups]))
    c_out = _unit(np.stack([w_u[ids].mean(axis=0) for ids in groups]))
    assert set(t.data["saes"]) == set(parent.data["saes"])
    for sae_id, sae in t.data["saes"].items():
        assert sae["semantic_features"] == sae["attention_decoder_features"] == sae["attention_encoder_features"] == []
        w_enc, w_dec = _sae(cache, t, sae["folder"])
        p_enc, p_dec = _sae(cache, parent, parent.data["saes"][sae_id]["folder"])
        assert (w_enc.shape, w_dec.shape) == (p_enc.shape, p_dec.shape)
        # no feature aligned with any group centre (a random cosine in 128 dims has sd 0.09)
        assert np.abs(_unit(w_enc.T) @ c_in.T).max() < 0.45
        assert np.abs(_unit(w_dec * final_gain) @ c_out.T).max() < 0.45
        enc_norm = np.linalg.norm(w_enc, axis=0)
        assert 0.79 < enc_norm.min() and enc_norm.max() < 1.21  # the parent's non-semantic norm range
        assert np.abs(_unit(w_enc.T) @ _unit(p_enc.T).T).max() < 0.5  # not the parent's directions


def test_model_only_structure_is_strong_and_in_no_feature(cache: Path, truths: dict[str, PlantedTruth]) -> None:
    """The model-only rows: pushed through the same circuits, their own key directions (read from the weights) are
    as selective as planted features and follow the model-only shape; the null SAE of the same model shows 0."""
    t = truths["planted-gemma"]
    attn, p = t.data["attention"], t.data["params"]
    config, state = load_model(cache, t.model_repo)
    circ = Circuits(config, state)
    lo, hi = attn["rows"]["1"]["model_only"]["rows"]
    z = []
    for layer in range(1, p["n_layers"]):
        g = circ.gain(f"model.layers.{layer}.input_layernorm.weight")
        keys = _unit_t(state[f"model.layers.{layer}.self_attn.k_proj.weight"][lo:hi] * g)  # ~ s b + background
        null = null_directions(circ.d, layer)
        z.append(
            np.mean(
                [
                    robust_z(circ.qk_feature_key(keys, layer, h), circ.qk_feature_key(null, layer, h)).mean()
                    for h in range(circ.n_heads)
                ]
            )
        )
    z, s = np.array(z), np.array(attn["model_only"]["qk"]["strength"]).mean(1)
    assert attn["model_only"]["qk"]["shape"] == "U" != attn["decoder_unembedding"]["shape"]
    assert np.corrcoef(z, s)[0, 1] > 0.9 and z.max() > 5 and _shape_ok(z, "U"), z


@pytest.mark.parametrize(
    ("fraction", "rid"),
    [(0.05, "planted-gemma"), (0.60, "planted-gemma"), (0.05, "planted-llama"), (0.02, "planted-gemma3")],
)
def test_semantic_fraction_is_free(tmp_path: Path, fraction: float, rid: str) -> None:
    t = generate(rid, tmp_path, overrides={"semantic_fraction": fraction})
    p, attn = t.data["params"], t.data["attention"]
    n_sem = round(fraction * p["d_sae"])
    rows = min(p["attn_rank"], n_sem // p["n_kv_heads"])
    assert attn["rank"]["decoder_rows"] == attn["rank"]["encoder_rows"] == rows
    assert bool(attn["rank"]["reduced"]) == (rows < p["attn_rank"])
    for sae in t.data["saes"].values():
        sem = {f["index"]: f for f in sae["semantic_features"]}
        assert len(sem) == n_sem
        assert set(sae["attention_encoder_features"]) <= set(sem)
        assert set(sae["attention_decoder_features"]) <= set(sem)
        assert len(sae["attention_encoder_features"]) == p["n_kv_heads"] * rows
    if p["architecture"] != "llama":  # tied: writer input groups avoid the same layer's reader output groups
        for layer in range(1, p["n_layers"]):
            r = attn["rows"][str(layer)]
            out = set(sum(r["decoder_readers"]["output_groups_per_kv_head"], []))
            inp = set(sum(r["encoder_writers"]["input_groups_per_kv_head"], []))
            assert not out & inp or n_sem < 2 * p["n_kv_heads"] * rows


def test_z_rises_monotonically_with_the_planted_strength(tmp_path: Path) -> None:
    """Over the registry's strength range (s_min .. s_max) the feature z rises steadily in both phases: the
    planted strength is read as a graded selectivity, not a saturated on/off."""
    means = []
    for i, s in enumerate((0.25, 0.5, 0.8, 1.2)):
        cache = tmp_path / str(i)
        t = generate(
            "planted-gemma",
            cache,
            layers=[1, 3],
            overrides={"enc_profile": "flat", "dec_profile": "flat", "s_min": s, "s_max": s, "head_scale_min": 1.0},
        )
        prof = z_profiles(cache, t)
        means.append([prof[phase]["attn"].mean() for phase in PHASES])
    means = np.array(means)
    assert (np.diff(means, axis=0) > 0.5).all() and means[0].max() < 2 and means[-1].min() > 6, means


def test_planted_z_survives_function_preserving_rescales(cache: Path, truths: dict[str, PlantedTruth]) -> None:
    """The planted strength is not a scale: rescaling a Gemma layer's o_proj (divided out by the post-attention
    norm), ``W_Q c, W_K / c`` and ``W_V c, W_O / c`` leave every z of the helper unchanged."""
    t = truths["planted-gemma"]
    config, state = load_model(cache, t.model_repo)
    sae = t.data["saes"]["layer_2/width_512/average_l0_32"]
    enc, dec = load_sae(cache, t, sae["folder"])
    before = [
        phase_z(Circuits(config, state), d, ph, 2)
        for d, ph in ((enc, "encoder_embedding"), (dec, "decoder_unembedding"))
    ]
    rescaled = dict(state)
    for layer in (2, 3):
        pre = f"model.layers.{layer}.self_attn."
        rescaled[pre + "o_proj.weight"] = state[pre + "o_proj.weight"] * 7.0
        rescaled[pre + "q_proj.weight"] = state[pre + "q_proj.weight"] * 3.0
        rescaled[pre + "k_proj.weight"] = state[pre + "k_proj.weight"] / 3.0
        rescaled[pre + "v_proj.weight"] = state[pre + "v_proj.weight"] * 0.2
        rescaled[pre + "o_proj.weight"] = rescaled[pre + "o_proj.weight"] / 0.2
    after = [
        phase_z(Circuits(config, rescaled), d, ph, 2)
        for d, ph in ((enc, "encoder_embedding"), (dec, "decoder_unembedding"))
    ]
    for b, a in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_flat_profile(tmp_path: Path) -> None:
    t = generate("planted-gemma", tmp_path, overrides={"enc_profile": "flat", "dec_profile": "flat"})
    attn = t.data["attention"]
    assert attn["model_only"]["qk"]["shape"] == attn["model_only"]["ov"]["shape"] == "flat"
    prof = z_profiles(tmp_path, t)
    for phase in PHASES:
        s = np.array(attn[phase]["strength"])
        assert attn[phase]["shape"] == "flat" and np.allclose(s, s[:1])
        z = prof[phase]["attn"]
        assert _shape_ok(z, "flat") and z.min() > 2, (phase, z)


def test_layers_subset_and_determinism(cache: Path, truths: dict[str, PlantedTruth], tmp_path: Path) -> None:
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
    null = generate("planted-gemma-null", tmp_path, layers=[4])  # the null release: same model, same files
    assert null.model_commit == t.model_commit
    name = "layer_4/width_512/average_l0_32/params.npz"
    a = hf_hub_download(truths["planted-gemma-null"].sae_repo, name, cache_dir=cache, local_files_only=True)
    b = hf_hub_download(null.sae_repo, name, cache_dir=tmp_path, local_files_only=True)
    assert Path(a).read_bytes() == Path(b).read_bytes()


def test_truth_json_is_in_the_sae_repo(cache: Path, truths: dict[str, PlantedTruth]) -> None:
    t = truths["planted-llama"]
    data: dict[str, Any] = json.loads(
        Path(hf_hub_download(t.sae_repo, "planted_truth.json", cache_dir=cache, local_files_only=True)).read_text()
    )
    assert data == json.loads(json.dumps(t.data))
    assert data["format_version"] == 1 and data["release_id"] == "planted-llama"
    assert data["model_commit"] == t.model_commit
    assert {"encoder_embedding", "decoder_unembedding"} <= data["attention"].keys()
    forms = {g["id"]: {t.replace("Ġ", "").casefold() for t in g["tokens"]} for g in data["token_groups"]}
    for g in data["token_groups"]:  # a stem family of 6-12 tokens completed with unrelated words to 12 forms
        assert 6 <= len(set(g["token_ids"]) - set(g["extra_ids"])) <= 12 and len(forms[g["id"]]) >= 12
    attn, n, heads = data["attention"], data["params"]["n_layers"], data["params"]["n_heads"]
    assert "layer L+1" in attn["pairing"] and "layer L" in attn["pairing"]
    assert np.array(attn["decoder_unembedding"]["strength"]).shape == (n - 1, heads)  # SAE layers 0..N-2
    assert attn["decoder_unembedding"]["layers"] == list(range(n - 1))
    assert np.array(attn["encoder_embedding"]["strength"]).shape == (n, heads)
    assert attn["encoder_embedding"]["layers"] == list(range(n))
    assert (attn["encoder_embedding"]["shape"], attn["decoder_unembedding"]["shape"]) == ("inverted-U", "U")
    assert attn["model_only"]["qk"]["shape"] == "inverted-U" and attn["model_only"]["ov"]["shape"] == "U"
    assert np.array(attn["model_only"]["qk"]["strength"]).shape == (n - 1, heads)
    assert sorted(attn["rows"]) == sorted(str(layer) for layer in range(n))
    for sae in data["saes"].values():
        assert {
            "semantic_features",
            "non_semantic_encoder_norm_mean",
            "non_semantic_decoder_norm_mean",
            "attention_decoder_features",
            "attention_encoder_features",
        } <= sae.keys()
        assert sae["encoder_cross_talk_features"] == sae["decoder_cross_talk_features"] == []  # untied: none


if __name__ == "__main__":  # print the z profiles of every planted release (python -m tests.test_planted)
    import tempfile

    import yaml

    from core.testbeds.planted import _REGISTRY

    registry = yaml.safe_load(_REGISTRY.read_text())["releases"]
    with tempfile.TemporaryDirectory() as tmp:
        for release in (k for k, v in registry.items() if "planted" in v):
            truth = generate(release, Path(tmp))
            prof = z_profiles(Path(tmp), truth)
            print(f"{release}:")
            for phase, values in prof.items():
                strength = np.array(truth.data["attention"][phase]["strength"]).mean(1)
                print(
                    f"  {phase} ({truth.data['attention'][phase]['shape']}), SAE layers "
                    f"{truth.data['attention'][phase]['layers']}"
                )
                for key, row in (("strength", strength), ("z attn", values["attn"]), ("z all", values["all"])):
                    print(f"    {key:9s}" + " ".join(f"{x:6.2f}" for x in row))
