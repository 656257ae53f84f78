"""The function-preserving rewrites of ``tests/rewrites.py`` leave every logit of transformers' own models unchanged.

Reference: the planted release's model as transformers loads it (stored dtype, eager attention) on a fixed batch of
token ids (two sequences of 12). Tolerances, with ``M = max |logit|`` of the original:

* pairs in ``EXACT``: ``torch.equal`` (bit-identical, in the stored dtype);
* float32 Gemma-2 / Gemma 3 (scale through an RMSNorm's eps): ``max |Δ| <= 1e-5 M`` (seen: <= 5.4e-6 M);
* bfloat16 Llama ``residual_scale`` (c = 4 through every norm's eps 1e-5; bf16 roundings flip): ``max |Δ| <=
  2e-2 M`` and ``mean |Δ| <= 2e-3 M`` (seen: 8.0e-3 M = 2 bf16 ulps at |logit| ~ 6, mean 6.7e-4 M);
* and every non-exact pair becomes bit-identical once every RMSNorm's eps is set to 0 (except Gemma 3's
  ``norm_gain_move`` with c = 0.5, whose ``(1 + w) c - 1`` is also rounded in float32).

Besides the logits: the rewrite changed the tensors it names (and no others), left the original model alone, and
``write_rewritten_release`` gives a hub cache whose model repo has a new ``refs/main`` commit that
``ModelCheckpoint`` and transformers read offline, with the old snapshot and the SAE repo still there.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import snapshot_download
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from core.registry import get_release
from core.testbeds.planted import generate
from core.weights.hub_cache import read_tree, repo_cache_dir
from core.weights.model_weights import ModelCheckpoint
from tests.rewrites import (
    EXACT,
    INDEX_FILE,
    REWRITES,
    load_release_model,
    qk_head_scale,
    snapshot_dir,
    vo_head_scale,
    write_rewritten_release,
)

pytestmark = pytest.mark.unit

RELEASES = tuple(REWRITES)
CASES = [(release, name) for release in RELEASES for name in REWRITES[release]]
FLOAT32_REL = 1e-5
BF16_MAX_REL, BF16_MEAN_REL = 2e-2, 2e-3
# Tensors a rewrite may change (any layer); which ones it must change is checked below.
ALLOWED = {
    "o_proj_scale": r"model\.layers\.\d+\.self_attn\.o_proj\.weight",
    "residual_scale": r"model\.embed_tokens\.weight|model\.layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)\.weight",
    "norm_gain_move": r"model\.layers\.\d+\.(input_layernorm|self_attn\.[qkv]_proj)\.weight",
    "qk_head_scale": r"model\.layers\.\d+\.self_attn\.[qk]_proj\.weight",
    "vo_head_scale": r"model\.layers\.\d+\.self_attn\.[vo]_proj\.weight",
}
# The one release rewrite written into a hub cache per release, and a tensor it must change.
WRITTEN = {
    "planted-gemma": ("o_proj_scale", "model.layers.0.self_attn.o_proj.weight"),
    "planted-llama": ("residual_scale", "model.embed_tokens.weight"),
    "planted-gemma3": ("o_proj_scale", "model.layers.1.self_attn.o_proj.weight"),
}


@pytest.fixture(scope="session")
def rewrite_hub(tmp_path_factory):
    """A hub cache holding the three planted releases (model + SAE repos), generated once."""
    cache = tmp_path_factory.mktemp("rewrite-hub")
    for release in RELEASES:
        generate(release, cache)
    return cache


@pytest.fixture(scope="module")
def token_ids():
    return torch.randint(0, 16384, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def originals(rewrite_hub, token_ids):
    """release -> (model, its state dict cloned, reference logits), eager attention, stored dtype."""
    out = {}
    for release in RELEASES:
        model = load_release_model(rewrite_hub, release, attn_implementation="eager").eval()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        out[release] = (model, state, _logits(model, token_ids))
    return out


def assert_logits_match(release: str, name: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if (release, name) in EXACT:
        assert torch.equal(out, ref), f"{release} {name}: max |Δ| {(out - ref).abs().max().item()}"
        return
    diff = (out.float() - ref.float()).abs()
    scale = ref.float().abs().max().item()
    if ref.dtype == torch.bfloat16:
        assert diff.max().item() <= BF16_MAX_REL * scale, (release, name, diff.max().item(), scale)
        assert diff.mean().item() <= BF16_MEAN_REL * scale, (release, name, diff.mean().item(), scale)
    else:
        assert ref.dtype == torch.float32
        assert diff.max().item() <= FLOAT32_REL * scale, (release, name, diff.max().item(), scale)


def _zero_eps(model) -> None:
    for module in model.modules():
        if "RMSNorm" in type(module).__name__:
            for attr in ("eps", "variance_epsilon"):
                if hasattr(module, attr):
                    setattr(module, attr, 0.0)


@pytest.mark.parametrize(("release", "name"), CASES)
def test_rewrite_preserves_logits_and_changes_weights(originals, token_ids, release, name):
    model, state, ref = originals[release]
    new = REWRITES[release][name](model).eval()
    assert new is not model and new.dtype == model.dtype
    assert_logits_match(release, name, _logits(new, token_ids), ref)

    # the original is untouched; the copy differs exactly in tensors the rewrite may touch
    assert all(torch.equal(t, state[k]) for k, t in model.state_dict().items())
    new_state = new.state_dict()
    changed = {k for k, t in new_state.items() if not torch.equal(t, state[k])}
    assert changed, f"{release} {name} changed no weight"
    assert all(re.fullmatch(ALLOWED[name], k) for k in changed), sorted(changed)
    n_layers = model.config.num_hidden_layers
    o_projs = {f"model.layers.{i}.self_attn.o_proj.weight" for i in range(n_layers)}
    if name == "o_proj_scale":  # a different c per layer: every o_proj, none by the same factor as the next
        assert changed == o_projs
        ratios = [
            (new_state[k].double() / state[k].double()).unique().tolist()
            for k in sorted(o_projs, key=lambda k: int(k.split(".")[2]))
        ]
        assert all(len(r) == 1 for r in ratios) and all(a != b for a, b in zip(ratios, ratios[1:]))
    elif name == "residual_scale":
        downs = {f"model.layers.{i}.mlp.down_proj.weight" for i in range(n_layers)}
        assert changed == {"model.embed_tokens.weight"} | o_projs | downs
        assert torch.equal(new_state["lm_head.weight"], state["lm_head.weight"])
    else:
        assert len({k.split(".")[2] for k in changed}) == 1  # one layer
        expect = {"norm_gain_move": 4, "qk_head_scale": 2, "vo_head_scale": 2}[name]
        assert len(changed) == expect, sorted(changed)


# Gemma 3 norm_gain_move uses c = 0.5: (1 + w) c - 1 is rounded in float32, a second source besides eps.
GAIN_ROUNDED = {("planted-gemma3", "norm_gain_move")}


@pytest.mark.parametrize(("release", "name"), [case for case in CASES if case not in EXACT | GAIN_ROUNDED])
def test_only_eps_breaks_exactness(originals, token_ids, release, name):
    """With every RMSNorm's eps set to 0 the tolerance pairs are bit-identical too."""
    model = copy.deepcopy(originals[release][0])
    new = REWRITES[release][name](model).eval()
    _zero_eps(model)
    _zero_eps(new)
    assert torch.equal(_logits(new, token_ids), _logits(model, token_ids))


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_gqa_group_of_second_kv_head(arch, token_ids):
    """GQA (4 query heads, 2 kv heads): kv head 1 is read by query heads 2 and 3; the head rewrites touch only
    those rows / columns and stay exact. (The planted models have one kv head.)"""
    torch.manual_seed(0)
    common = dict(
        vocab_size=16384,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False)).to(torch.bfloat16)
    else:
        model = Gemma2ForCausalLM(Gemma2Config(**common, query_pre_attn_scalar=24))
    model.config._attn_implementation = "eager"
    model.eval()
    ref = _logits(model, token_ids)
    hd = 16
    pre = "model.layers.1.self_attn."
    for rewrite, kept in (
        (lambda m: qk_head_scale(m, 1, 1, 4.0), {"q_proj": slice(0, 2 * hd), "k_proj": slice(0, hd)}),
        (lambda m: vo_head_scale(m, 1, 1, 0.25), {"v_proj": slice(0, hd)}),
    ):
        new = rewrite(model).eval()
        assert torch.equal(_logits(new, token_ids), ref)
        old_s, new_s = model.state_dict(), new.state_dict()
        for proj, rows in kept.items():
            w_old, w_new = old_s[pre + proj + ".weight"], new_s[pre + proj + ".weight"]
            assert torch.equal(w_old[rows], w_new[rows]) and not torch.equal(w_old, w_new)
        if "v_proj" in kept:
            o_old, o_new = old_s[pre + "o_proj.weight"], new_s[pre + "o_proj.weight"]
            assert torch.equal(o_old[:, : 2 * hd], o_new[:, : 2 * hd])
            assert torch.equal(o_new[:, 2 * hd :], o_old[:, 2 * hd :] * 4)


@pytest.mark.parametrize("release", RELEASES)
def test_write_rewritten_release(rewrite_hub, tmp_path, originals, token_ids, release):
    from transformers import AutoModelForCausalLM

    name, tensor = WRITTEN[release]
    entry = get_release(release)
    old_commit = (repo_cache_dir(rewrite_hub, entry.model_repo) / "refs" / "main").read_text()
    old_tree = read_tree(rewrite_hub, entry.model_repo)
    sae_tree = read_tree(rewrite_hub, entry.sae_repo)
    dst = tmp_path / "hub"
    assert write_rewritten_release(rewrite_hub, dst, release, REWRITES[release][name]) == dst

    # source untouched; destination: new refs/main, old snapshot kept, SAE repo as it was
    assert (repo_cache_dir(rewrite_hub, entry.model_repo) / "refs" / "main").read_text() == old_commit
    new_commit = (repo_cache_dir(dst, entry.model_repo) / "refs" / "main").read_text()
    assert new_commit != old_commit
    assert read_tree(dst, entry.model_repo, old_commit) == old_tree
    assert read_tree(dst, entry.sae_repo) == sae_tree
    assert all(p.exists() for p in snapshot_dir(dst, entry.sae_repo).rglob("*"))
    new_tree = read_tree(dst, entry.model_repo)
    assert set(new_tree) == set(old_tree)  # same files: shards, index, config, tokenizer
    shards = sorted(p for p in new_tree if p.endswith(".safetensors"))
    assert len(shards) >= 2
    changed = {p for p in new_tree if new_tree[p] != old_tree[p]}
    assert changed and changed <= set(shards) | {INDEX_FILE}
    assert all(new_tree[p] == old_tree[p] for p in new_tree if p.startswith("tokenizer"))
    snap = snapshot_dir(dst, entry.model_repo)
    assert snap.name == new_commit
    assert Path(snapshot_download(entry.model_repo, cache_dir=dst, local_files_only=True)) == snap
    weight_map = json.loads((snap / INDEX_FILE).read_text())["weight_map"]
    assert set(weight_map.values()) == set(shards)
    assert set(weight_map) == set(
        json.loads((snapshot_dir(dst, entry.model_repo, old_commit) / INDEX_FILE).read_text())["weight_map"]
    )

    # ModelCheckpoint reads the rewritten tensor; transformers loads the new commit offline
    model, state, ref = originals[release]
    expected = REWRITES[release][name](model)
    got = ModelCheckpoint(snap).tensor(tensor)
    assert torch.equal(got, expected.state_dict()[tensor].float())
    assert not torch.equal(got, state[tensor].float())
    loaded = AutoModelForCausalLM.from_pretrained(
        entry.model_repo, cache_dir=dst, local_files_only=True, dtype="auto", attn_implementation="eager"
    ).eval()
    assert loaded.dtype == model.dtype
    out = _logits(loaded, token_ids)
    assert torch.equal(out, _logits(expected.eval(), token_ids))
    assert_logits_match(release, name, out, ref)
