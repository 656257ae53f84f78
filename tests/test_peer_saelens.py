"""Peer cross-checks against SAELens and TransformerLens, on the planted releases (offline) and the registry.

Needs the optional extra ``peer`` (``pip install -e ".[test,peer]"``: sae-lens, which brings transformer-lens);
the whole module is skipped where ``sae_lens`` is not importable.

* SAE weights: SAELens' own loaders (``sae_lens.loading.pretrained_sae_loaders``), called on the planted repos of
  every format, give the same W_enc, W_dec, b_enc, b_dec, threshold as ``core.weights.sae_formats`` — bit for bit. Gemma
  Scope 2 and Llama Scope go through ``SAE.from_pretrained`` (the repo id as release, the folder as SAE id, the
  format's loader as converter); for Llama Scope SAELens then skips its activation-norm fold (the planted release has
  no ``norm_scaling_factor`` in its ``pretrained_saes.yaml``; every real Llama Scope SAE has one), so the test applies
  SAELens' own ``fold_activation_norm_scaling_factor(s)`` with ``s = sqrt(d_model) / dataset_average_activation_norm
  ["in"]``, the value that yaml lists. Gemma Scope goes through the loader alone: SAELens' Gemma Scope config reader
  takes the model (d_in) from the repo id, which must name 2b/9b/27b, and the width from the folder (16k, 65k, ...),
  so the planted repo is linked under a repo id naming 2b and only the loader's tensors (read from the file, not the
  config) are compared.
* Output lens: TransformerLens' processed unembedding (``HookedTransformer.from_pretrained`` on the planted
  transformers model with TL's default processing: ``fold_ln``, ``center_writing_weights``, ``center_unembed`` —
  which TL turns off under a logit softcap) gives the same top-k tokens and values as ``core.lens.output_lens``.
  ``from_pretrained`` accepts only official model names, so TL's config recipe of the real model (gemma-2-2b,
  gemma-3-1b-pt, Llama-3.1-8B) is resized to the planted config; only the final norm and the unembedding are read.
* Registry: for every release both know, SAELens' ``pretrained_saes.yaml`` and ``core/releases.yaml`` give the same
  repository, SAE ids -> folders, canonical tables and (where both give one) Neuronpedia ids.

Network: SAELens reads files through ``hf_hub_download`` without a ``cache_dir`` (pointed at the planted cache, with
huggingface_hub's offline flag set); its Gemma Scope 2 config reader also fetches safetensors headers with plain
``requests`` range requests (``get_safetensors_tensor_shapes``), which ignore ``HF_HUB_OFFLINE`` — the one network
call patched here, to read the same header from the cached file.
"""

from __future__ import annotations

import importlib.resources
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch

PEER_EXTRA = "the peer cross-checks need the optional extra `peer` (pip install -e '.[test,peer]'): sae-lens"
pytestmark = pytest.mark.chain
pytest.importorskip("sae_lens", reason=f"{PEER_EXTRA} is not installed")
pytest.importorskip("transformer_lens", reason=f"{PEER_EXTRA} is not installed")

import huggingface_hub.constants  # noqa: E402
import transformer_lens.loading_from_pretrained as tl_loading  # noqa: E402
import yaml  # noqa: E402
from huggingface_hub import hf_hub_download  # noqa: E402
from sae_lens import SAE  # noqa: E402
from sae_lens.loading import pretrained_sae_loaders as loaders  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformer_lens import HookedTransformer  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from core.lens.output_lens import null_directions, output_lens  # noqa: E402
from core.registry import Release, SaeRef, UnknownReleaseError, get_release, load_registry  # noqa: E402
from core.testbeds.planted import generate  # noqa: E402
from core.weights.discovery import discover_saes, fetch_model, fetch_sae  # noqa: E402
from core.weights.hub import Hub  # noqa: E402
from core.weights.sae_formats import FORMATS, SaeWeights  # noqa: E402

PLANTED = ("planted-gemma", "planted-llama", "planted-gemma3")  # one per format
TENSORS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
# SAELens' Gemma Scope config reader needs a repo id naming the model size (get_gemma_2_config_from_hf).
GEMMA_SCOPE_ALIAS = "planted/gemma-scope-tiny-2b-pt-res"
# TransformerLens' config recipe per transformers model_type: the real model whose recipe is resized.
TL_RECIPE = {"gemma2": "google/gemma-2-2b", "gemma3_text": "google/gemma-3-1b-pt", "llama": "meta-llama/Llama-3.1-8B"}
TL_ATTENTION = {"sliding_attention": "local", "full_attention": "global"}
# SAELens ids the registry refuses, by design, with the reason (``refused`` in releases.yaml): Gemma Scope's
# embedding SAEs (hook_embed, not resid_post).
NOT_IN_REGISTRY = re.compile(r"^embedding/")
# SAELens 6.54's base gemma-scope-9b-it-res entry names the model gemma-2-9b, its -canonical entry gemma-2-9b-it (the
# SAEs read the instruction-tuned model): a slip in its data; the registry's model is the IT one.
SAELENS_MODEL_SLIPS = {"gemma-scope-9b-it-res": "gemma-2-9b"}
# ... and lists layer_20/width_524k/canonical with l0 78 but path average_l0_48
# (the path is what it loads; releases.yaml)
SAELENS_L0_SLIPS = {("gemma-scope-9b-pt-res-canonical", "layer_20/width_524k/canonical"): 78}
# Neuronpedia ids in SAELens' base Gemma Scope releases that name another SAE than the entry's path (sae-lens 6.54.12):
# reported, not copied into the registry.
SAELENS_NEURONPEDIA_ERRORS = {
    ("gemma-scope-9b-pt-res", "layer_2/width_16k/average_l0_8"): "gemma-2-9b/20-gemmascope-res-131k__l0-10",
    ("gemma-scope-9b-pt-res", "layer_20/width_131k/average_l0_114"): "gemma-2-9b/20-gemmascope-res-131k__l0-12",
}


def _link_repo(cache: Path, source: Path, repo_id: str) -> None:
    """Make ``repo_id`` in hub cache ``cache`` a symlink to a repo folder of another cache."""
    (cache / f"models--{repo_id.replace('/', '--')}").symlink_to(source, target_is_directory=True)


@pytest.fixture(scope="module")
def peer_cache(planted_cache: Path, tmp_path_factory) -> Path:
    """A hub cache with the three planted formats: planted-gemma and planted-llama linked from the session's planted
    cache (their SAE repo also under ``GEMMA_SCOPE_ALIAS``), planted-gemma3 generated."""
    cache = tmp_path_factory.mktemp("peer-hub")
    for rid in PLANTED[:2]:
        release = get_release(rid)
        for repo in (release.sae_repo, release.model_repo):
            _link_repo(cache, planted_cache / f"models--{repo.replace('/', '--')}", repo)
    gemma = get_release("planted-gemma").sae_repo
    _link_repo(cache, planted_cache / f"models--{gemma.replace('/', '--')}", GEMMA_SCOPE_ALIAS)
    generate("planted-gemma3", cache)
    return cache


def _cached_tensor_shapes(repo_id: str, filename: str) -> dict[str, list[int]]:
    """Stand-in for SAELens' ``get_safetensors_tensor_shapes`` (HTTP range requests for the header): the shapes from
    the header of the cached file."""
    with safe_open(hf_hub_download(repo_id, filename), framework="pt") as f:
        return {name: list(f.get_slice(name).get_shape()) for name in f.keys()}


@pytest.fixture
def saelens_offline(peer_cache: Path, monkeypatch) -> Path:
    """SAELens reading ``peer_cache`` offline (module docstring, Network)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(peer_cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(loaders, "get_safetensors_tensor_shapes", _cached_tensor_shapes)
    return peer_cache


def _ours(rid: str, cache: Path) -> dict[SaeRef, SaeWeights]:
    """Every SAE of a planted release read by ``core.weights.sae_formats``."""
    hub = Hub(cache_dir=cache, offline=True)
    fmt = FORMATS[get_release(rid).format]
    return {ref: fmt.read(fetch_sae(ref, hub).path(ref.folder)) for ref in discover_saes(rid, hub).saes}


def _assert_same(ours: SaeWeights, theirs: dict[str, torch.Tensor], where: str) -> None:
    for name in TENSORS:
        torch.testing.assert_close(
            getattr(ours, name), theirs[name].detach(), rtol=0, atol=0, msg=lambda m, n=name: f"{where} {n}: {m}"
        )


def _parameters(sae: Any) -> dict[str, torch.Tensor]:
    return {name: getattr(sae, name) for name in TENSORS}


def test_gemma_scope_npz_matches_saelens_loader(saelens_offline):
    for ref, ours in _ours("planted-gemma", saelens_offline).items():
        _, state, _ = loaders.gemma_2_sae_huggingface_loader(GEMMA_SCOPE_ALIAS, ref.folder, device="cpu")
        _assert_same(ours, state, ref.key)


def test_gemma_scope_2_matches_saelens_from_pretrained(saelens_offline):
    repo = get_release("planted-gemma3").sae_repo
    for ref, ours in _ours("planted-gemma3", saelens_offline).items():
        sae = SAE.from_pretrained(repo, ref.folder, converter=loaders.gemma_3_sae_huggingface_loader)
        assert sae.cfg.metadata.hook_name == f"blocks.{ref.layer}.hook_resid_post"
        _assert_same(ours, _parameters(sae), ref.key)


def test_llama_scope_matches_saelens_from_pretrained_with_its_norm_fold(saelens_offline):
    """SAELens' unfolded SAE has the file's weights and threshold θ·s; after SAELens' own fold with s (what its
    pretrained_saes.yaml lists as norm_scaling_factor) every tensor equals this project's Llama Scope reader."""
    repo = get_release("planted-llama").sae_repo
    for ref, ours in _ours("planted-llama", saelens_offline).items():
        hp = json.loads(Path(hf_hub_download(repo, f"{ref.folder}/hyperparams.json")).read_text())
        s = math.sqrt(hp["d_model"]) / hp["dataset_average_activation_norm"]["in"]
        with pytest.warns(UserWarning, match="norm_scaling_factor not found"):  # not in SAELens' yaml: no fold
            sae = SAE.from_pretrained(repo, ref.folder, converter=loaders.llama_scope_sae_huggingface_loader)
        torch.testing.assert_close(sae.W_dec.detach(), ours.W_dec * s)  # the file's (unfolded) decoder
        torch.testing.assert_close(sae.threshold.detach(), ours.threshold, rtol=0, atol=0)  # θ·s already
        sae.fold_activation_norm_scaling_factor(s)
        _assert_same(ours, _parameters(sae), ref.key)


def test_trained_llama_scope_threshold_reads_back_in_saelens(trained_llama, monkeypatch):
    """The trained Llama Scope SAEs store ``jump_relu_threshold = θ / s`` (``core.testbeds.trained``) so that SAELens'
    ``threshold = jump_relu_threshold · s`` is the trained θ: SAELens and ``core.weights.sae_formats`` read the same θ,
    and after SAELens' own fold every tensor is the same."""
    cache, release = trained_llama
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    theta = release.metrics["params"]["sae_threshold"]
    for q in release.metrics["saes"].values():
        hyperparams = Path(hf_hub_download(release.sae_repo, f"{q['folder']}/hyperparams.json"))
        ours = FORMATS["llama_scope_safetensors"].read(hyperparams.parent)
        hp = json.loads(hyperparams.read_text())
        s = math.sqrt(hp["d_model"]) / hp["dataset_average_activation_norm"]["in"]
        with pytest.warns(UserWarning, match="norm_scaling_factor not found"):
            sae = SAE.from_pretrained(
                release.sae_repo, q["folder"], converter=loaders.llama_scope_sae_huggingface_loader
            )
        torch.testing.assert_close(sae.threshold.detach(), torch.full_like(sae.threshold, theta))
        torch.testing.assert_close(ours.threshold, sae.threshold.detach(), rtol=0, atol=0)
        sae.fold_activation_norm_scaling_factor(s)
        _assert_same(ours, _parameters(sae), q["folder"])


def _tl_config(hf_config: Any) -> dict[str, Any]:
    """The planted model's dimensions in TransformerLens' config keys (overriding the real model's recipe)."""
    c = hf_config
    dims = dict(
        d_model=c.hidden_size,
        d_head=c.head_dim,
        n_heads=c.num_attention_heads,
        d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers,
        d_vocab=c.vocab_size,
        n_key_value_heads=c.num_key_value_heads,
        eps=c.rms_norm_eps,
    )
    if c.model_type == "llama":
        return {**dims, "rotary_dim": c.head_dim}
    dims |= dict(attn_types=[TL_ATTENTION[t] for t in c.layer_types], window_size=c.sliding_window)
    if c.final_logit_softcapping:
        dims["output_logits_soft_cap"] = c.final_logit_softcapping
    return dims


def _hooked_transformer(snapshot: Path) -> HookedTransformer:
    """TransformerLens' model of a planted checkpoint, with TL's default weight processing."""
    hf = AutoModelForCausalLM.from_pretrained(snapshot, dtype=torch.float32)
    recipe = tl_loading.convert_hf_model_config
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            tl_loading, "convert_hf_model_config", lambda name, **kw: {**recipe(name, **kw), **_tl_config(hf.config)}
        )
        return HookedTransformer.from_pretrained(
            TL_RECIPE[hf.config.model_type],
            hf_model=hf,
            device="cpu",
            tokenizer=AutoTokenizer.from_pretrained(snapshot),
        )


def _tl_logits(model: HookedTransformer, directions: torch.Tensor) -> torch.Tensor:
    """TransformerLens' logits when ``directions`` (rows) are the final residual stream: ln_final, unembed, softcap."""
    with torch.no_grad():
        logits = model.unembed(model.ln_final(directions[:, None, :]))[:, 0]
    cap = model.cfg.output_logits_soft_cap
    return cap * torch.tanh(logits / cap) if cap > 0 else logits


@pytest.mark.parametrize("rid", PLANTED)
def test_output_lens_matches_transformer_lens(peer_cache, rid):
    snapshot, checkpoint = fetch_model(rid, Hub(cache_dir=peer_cache, offline=True))
    model = _hooked_transformer(snapshot.root)
    gain, w_u = checkpoint.final_norm_gain(), checkpoint.unembedding().float()
    capped = model.cfg.output_logits_soft_cap > 0
    folded = gain[:, None] * w_u.T  # TL's processed W_U: final-norm gain folded in, centred over the vocabulary
    expected = folded if capped else folded - folded.mean(dim=1, keepdim=True)  # unless a softcap forbids it
    torch.testing.assert_close(model.W_U.detach(), expected, rtol=1e-5, atol=1e-6)

    sae = next(iter(_ours(rid, peer_cache).values()))
    directions = torch.cat([sae.decoder_directions(), null_directions(256, sae.d_model, f"peer:{rid}")])
    ours, theirs = output_lens(directions, checkpoint, k=10), _tl_logits(model, directions)
    top = theirs.topk(10)
    assert torch.equal(top.indices, ours.top_ids)
    # TL's centring shifts each row by its vocabulary mean; with a softcap it is off and the values are the same
    shift = (ours.mean - theirs.mean(dim=1))[:, None] if not capped else 0.0
    torch.testing.assert_close(top.values + shift, ours.top_values, rtol=1e-5, atol=1e-4)


def _saelens_registry() -> dict[str, dict[str, Any]]:
    text = importlib.resources.files("sae_lens").joinpath("pretrained_saes.yaml").read_text()
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


SAELENS = _saelens_registry()
SHARED = sorted((name, rid) for rid, release in load_registry().items() for name in release.names if name in SAELENS)


def test_registry_shares_releases_with_saelens():
    assert {name for name, _ in SHARED} >= {
        "gemma-scope-2b-pt-res",
        "gemma-scope-2b-pt-res-canonical",
        "gemma-scope-9b-pt-res",
        "gemma-scope-9b-pt-res-canonical",
        "gemma-scope-9b-it-res",
        "gemma-scope-9b-it-res-canonical",
        "llama_scope_lxr_8x",
        "llama_scope_lxr_32x",
        "gemma-scope-2-1b-pt-res",
        "gemma-scope-2-1b-pt-res-all",
    }


# SAELens 6.54's pretrained_saes.yaml gives these two SAEs another SAE's Neuronpedia id (layer and width differ from
# the SAE's own): slips in its data, not a convention.
SAELENS_NEURONPEDIA_SLIPS = {
    "layer_2/width_16k/average_l0_8": "gemma-2-9b/20-gemmascope-res-131k__l0-10",
    "layer_20/width_131k/average_l0_114": "gemma-2-9b/20-gemmascope-res-131k__l0-12",
}


def known_neuronpedia_difference(release: Release, sae_id: str, theirs: str, ours: str) -> bool:
    """A difference the registry makes on purpose: an SAE with its layer's canonical L0, named by its concrete
    id, takes the canonical set's id (Neuronpedia's canonical sets cover every layer) where SAELens gives the
    L0-suffixed one (both exist on Neuronpedia); or one of SAELens' slips."""
    if SAELENS_NEURONPEDIA_SLIPS.get(sae_id) == theirs:
        return True
    fields = release.sae(sae_id)
    suffixed = release.neuronpedia.format(layer=fields.layer, width=fields.width, l0=fields.l0)
    return (
        release.canonical is not None
        and theirs == suffixed
        and ours == release.canonical.neuronpedia.format(layer=fields.layer, width=fields.width)
    )


def _same_neuronpedia(theirs: str, ref: SaeRef, known_error: str | None) -> bool:
    """Whether SAELens' Neuronpedia id of an SAE agrees with the registry's. Two known differences are accepted: a
    listed SAELens error, and a canonical SAE, which SAELens' base release names with its L0 suffix
    (``…-res-1m__l0-114``) and its ``-canonical`` release without (``…-res-1m``, the registry's id for it)."""
    return theirs in (ref.neuronpedia, known_error, f"{ref.neuronpedia}__l0-{ref.l0}")


@pytest.mark.parametrize("name, rid", SHARED, ids=[name for name, _ in SHARED])
def test_registry_ids_match_saelens(name, rid):
    """Every SAELens SAE id of the release names the same folder here (bar the ids the registry refuses by design,
    which raise naming why), with the same numeric L0 and Neuronpedia id where both give one; a canonical alias
    lists the same ids."""
    release: Release = get_release(rid)
    entry = SAELENS[name]
    assert entry["repo_id"] == release.sae_repo
    model = entry["model"].split("/")[-1]
    assert model == release.model_repo.split("/")[-1] or SAELENS_MODEL_SLIPS.get(name) == model
    mismatches, unparsed = [], []
    for sae in entry["saes"]:
        try:
            ref = release.sae(sae["id"])
        except UnknownReleaseError as refused:
            assert "not analysed here" in str(refused), refused
            unparsed.append(sae["id"])
            continue
        if ref.folder != sae["path"]:
            mismatches.append((sae["id"], "path", sae["path"], ref.folder))
        # numeric L0 (Llama Scope's, 50.0 for every SAE, is a float estimate: not compared)
        slip = SAELENS_L0_SLIPS.get((name, sae["id"]))
        if isinstance(sae.get("l0"), int) and ref.l0 != sae["l0"] and sae["l0"] != slip:
            mismatches.append((sae["id"], "l0", sae["l0"], ref.l0))
        theirs = sae.get("neuronpedia")
        if (
            theirs
            and ref.neuronpedia
            and theirs != ref.neuronpedia
            and not known_neuronpedia_difference(release, sae["id"], theirs, ref.neuronpedia)
        ):
            mismatches.append((sae["id"], "neuronpedia", theirs, ref.neuronpedia))
    assert mismatches == []
    assert [i for i in unparsed if not NOT_IN_REGISTRY.search(i)] == []
    if release.canonical and name == release.canonical.release:
        assert sorted(release.canonical.ids()) == sorted(sae["id"] for sae in entry["saes"])
