"""The release registry: ids, aliases, SAE ids, folder discovery, clear errors."""

from __future__ import annotations

import pytest

from core.registry import UnknownReleaseError, get_release, load_registry, parse_key


def test_required_releases_are_registered():
    releases = load_registry()
    assert {"gemma-scope-2b-pt-res", "gemma-scope-9b-pt-res", "llama-scope-lxr-8x", "planted-gemma", "planted-llama"} <= set(releases)
    assert releases["gemma-scope-2b-pt-res"].n_layers == 26
    assert releases["gemma-scope-9b-pt-res"].model_repo == "google/gemma-2-9b"
    llama = releases["llama-scope-lxr-8x"]
    assert (llama.sae_repo, llama.model_repo, llama.n_layers) == ("fnlp/Llama3_1-8B-Base-LXR-8x", "meta-llama/Llama-3.1-8B", 32)


def test_saelens_alias_resolves():
    assert get_release("llama_scope_lxr_8x").id == "llama-scope-lxr-8x"


def test_unknown_release_lists_known_ones():
    with pytest.raises(UnknownReleaseError) as err:
        get_release("gemma-scope-2b-pt-rez")
    message = str(err.value)
    assert "Did you mean gemma-scope-2b-pt-res" in message
    assert "llama-scope-lxr-8x" in message and "planted-gemma" in message


def test_discovery_matches_gemma_scope_listing():
    files = [
        "layer_0/width_16k/average_l0_105/params.npz",
        "layer_0/width_16k/average_l0_13/params.npz",
        "layer_12/width_65k/average_l0_72/params.npz",
        "layer_3/width_16k/average_l0_50/README.md",  # no params.npz: not an SAE
        "layer_30/width_16k/average_l0_50/params.npz",  # outside the model's 26 layers
        ".gitattributes",
    ]
    release = get_release("gemma-scope-2b-pt-res")
    with pytest.raises(UnknownReleaseError, match="layer 30 is outside"):
        release.discover(files, "params.npz")
    refs = release.discover(files[:-2], "params.npz")
    assert [r.sae_id for r in refs] == [
        "layer_0/width_16k/average_l0_13", "layer_0/width_16k/average_l0_105", "layer_12/width_65k/average_l0_72",
    ]
    assert (refs[2].layer, refs[2].width, refs[2].l0) == (12, "65k", 72)
    assert refs[2].key == "gemma-scope-2b-pt-res:layer_12/width_65k/average_l0_72"


def test_discovery_matches_llama_scope_listing():
    files = [
        "Llama3_1-8B-Base-L0R-8x/checkpoints/final.safetensors",
        "Llama3_1-8B-Base-L0R-8x/hyperparams.json",
        "Llama3_1-8B-Base-L31R-8x/checkpoints/final.safetensors",
    ]
    refs = get_release("llama-scope-lxr-8x").discover(files, "checkpoints/final.safetensors")
    assert [(r.sae_id, r.folder, r.layer) for r in refs] == [
        ("l0r_8x", "Llama3_1-8B-Base-L0R-8x", 0), ("l31r_8x", "Llama3_1-8B-Base-L31R-8x", 31),
    ]


def test_partition_key_round_trip_and_errors():
    ref = parse_key("llama_scope_lxr_8x:l12r_8x")
    assert (ref.release, ref.folder, ref.layer) == ("llama-scope-lxr-8x", "Llama3_1-8B-Base-L12R-8x", 12)
    assert parse_key(ref.key) == ref
    with pytest.raises(UnknownReleaseError, match="not of the form"):
        parse_key("l12r_8x")
    with pytest.raises(UnknownReleaseError, match="does not match release"):
        parse_key("llama-scope-lxr-8x:layer_12/width_16k/average_l0_82")
