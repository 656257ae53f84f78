"""The release registry: ids, aliases, SAELens canonical aliases, SAE ids, folder discovery, clear errors."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from core.errors import WeightFileError
from core.registry import UnknownReleaseError, get_release, load_registry, parse_key
from core.weights.discovery import discover_saes, fetch_model
from core.weights.hub import Hub

pytestmark = pytest.mark.unit


def test_required_releases_are_registered():
    releases = load_registry()
    assert {
        "gemma-scope-2b-pt-res",
        "gemma-scope-9b-pt-res",
        "llama_scope_lxr_8x",
        "planted-gemma",
        "planted-llama",
    } <= set(releases)
    assert releases["gemma-scope-2b-pt-res"].n_layers == 26
    assert releases["gemma-scope-9b-pt-res"].model_repo == "google/gemma-2-9b"
    llama = releases["llama_scope_lxr_8x"]
    assert (llama.sae_repo, llama.model_repo, llama.n_layers) == (
        "fnlp/Llama3_1-8B-Base-LXR-8x",
        "meta-llama/Llama-3.1-8B",
        32,
    )


def test_saelens_alias_resolves():
    assert get_release("llama-scope-lxr-8x").id == "llama_scope_lxr_8x"


def test_unknown_release_lists_known_ones():
    with pytest.raises(UnknownReleaseError) as err:
        get_release("gemma-scope-2b-pt-rez")
    message = str(err.value)
    assert "Did you mean gemma-scope-2b-pt-res" in message
    assert "llama_scope_lxr_8x" in message and "planted-gemma" in message


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
        "layer_0/width_16k/average_l0_13",
        "layer_0/width_16k/average_l0_105",
        "layer_12/width_65k/average_l0_72",
    ]
    assert (refs[2].layer, refs[2].width, refs[2].l0) == (12, "65k", 72)
    assert refs[2].key == "gemma-scope-2b-pt-res:layer_12/width_65k/average_l0_72"


def test_discovery_matches_llama_scope_listing():
    files = [
        "Llama3_1-8B-Base-L0R-8x/checkpoints/final.safetensors",
        "Llama3_1-8B-Base-L0R-8x/hyperparams.json",
        "Llama3_1-8B-Base-L31R-8x/checkpoints/final.safetensors",
    ]
    refs = get_release("llama_scope_lxr_8x").discover(files, "checkpoints/final.safetensors")
    assert [(r.sae_id, r.folder, r.layer) for r in refs] == [
        ("l0r_8x", "Llama3_1-8B-Base-L0R-8x", 0),
        ("l31r_8x", "Llama3_1-8B-Base-L31R-8x", 31),
    ]


def test_gemma_scope_2_seeds_l0_and_neuronpedia_follow_saelens():
    """``_seed_1`` retrainings are SAEs of their own (the optional ``[_seed_{seed}]`` segment), every bucket has
    SAELens' numeric L0 for its layer, and only the medium bucket without a seed has a Neuronpedia id."""
    release = get_release("gemma-scope-2-1b-pt-res")
    files = [
        f"resid_post/layer_13_width_262k_l0_{b}/params.safetensors" for b in ("small", "medium", "big", "medium_seed_1")
    ]
    refs = release.discover(files, "params.safetensors")
    assert [(r.sae_id, r.l0) for r in refs] == [
        ("layer_13_width_262k_l0_small", 20),
        ("layer_13_width_262k_l0_medium", 60),
        ("layer_13_width_262k_l0_medium_seed_1", 60),
        ("layer_13_width_262k_l0_big", 150),
    ]
    assert [r.neuronpedia for r in refs] == [None, "gemma-3-1b/13-gemmascope-2-res-262k", None, None]
    seeded = parse_key("gemma-scope-2-1b-pt-res:layer_13_width_262k_l0_medium_seed_1")
    assert seeded.folder == "resid_post/layer_13_width_262k_l0_medium_seed_1" and parse_key(seeded.key) == seeded
    every_layer = get_release("gemma-scope-2-1b-pt-res-all").sae("layer_0_width_16k_l0_big")
    assert (every_layer.folder, every_layer.l0) == ("resid_post_all/layer_0_width_16k_l0_big", 60)
    assert release.sae("layer_3_width_16k_l0_small").l0 is None  # a layer SAELens lists no L0 for


def test_embedding_saes_are_refused_with_the_reason():
    with pytest.raises(
        UnknownReleaseError, match=r"'embedding/width_4k/average_l0_6' .* not analysed here: .*hook_embed"
    ):
        parse_key("gemma-scope-2b-pt-res:embedding/width_4k/average_l0_6")


def test_partition_key_round_trip_and_errors():
    ref = parse_key("llama_scope_lxr_8x:l12r_8x")
    assert (ref.release, ref.folder, ref.layer) == ("llama_scope_lxr_8x", "Llama3_1-8B-Base-L12R-8x", 12)
    assert parse_key(ref.key) == ref
    with pytest.raises(UnknownReleaseError, match="not of the form"):
        parse_key("l12r_8x")
    with pytest.raises(UnknownReleaseError, match="does not match release"):
        parse_key("llama_scope_lxr_8x:layer_12/width_16k/average_l0_82")


# SAELens' -canonical ids and the folders they name, from sae_lens/pretrained_saes.yaml
# (jbloomAus/SAELens ed4ade3c8999cc8556e8d6b49afce2d2444ce2c4): a sample of every width entered.
SAELENS_CANONICAL = {
    "gemma-scope-2b-pt-res-canonical": {
        "layer_0/width_16k/canonical": "layer_0/width_16k/average_l0_105",
        "layer_3/width_16k/canonical": "layer_3/width_16k/average_l0_59",
        "layer_12/width_16k/canonical": "layer_12/width_16k/average_l0_82",
        "layer_25/width_16k/canonical": "layer_25/width_16k/average_l0_116",
        "layer_0/width_65k/canonical": "layer_0/width_65k/average_l0_73",
        "layer_12/width_65k/canonical": "layer_12/width_65k/average_l0_72",
        "layer_25/width_65k/canonical": "layer_25/width_65k/average_l0_93",
        "layer_19/width_1m/canonical": "layer_19/width_1m/average_l0_88",
        "layer_12/width_262k/canonical": "layer_12/width_262k/average_l0_121",
    },
    "gemma-scope-9b-pt-res-canonical": {
        "layer_0/width_16k/canonical": "layer_0/width_16k/average_l0_129",
        "layer_20/width_16k/canonical": "layer_20/width_16k/average_l0_68",
        "layer_41/width_16k/canonical": "layer_41/width_16k/average_l0_113",
        "layer_0/width_131k/canonical": "layer_0/width_131k/average_l0_41",
        "layer_20/width_131k/canonical": "layer_20/width_131k/average_l0_114",
        "layer_41/width_131k/canonical": "layer_41/width_131k/average_l0_84",
        "layer_9/width_1m/canonical": "layer_9/width_1m/average_l0_122",
        "layer_20/width_524k/canonical": "layer_20/width_524k/average_l0_48",
    },
}


@pytest.mark.parametrize("canonical_release", sorted(SAELENS_CANONICAL))
def test_canonical_ids_resolve_to_the_saelens_folder(canonical_release):
    base = get_release(canonical_release)
    assert base.id == canonical_release.removesuffix("-canonical") and base.canonical.release == canonical_release
    for alias, concrete in SAELENS_CANONICAL[canonical_release].items():
        ref = parse_key(f"{canonical_release}:{alias}")
        assert ref == parse_key(f"{base.id}:{concrete}") == base.sae(alias)
        assert (ref.key, ref.folder) == (f"{base.id}:{concrete}", concrete)  # one partition per folder
    for width in {"gemma-scope-2b-pt-res": ("16k", "65k"), "gemma-scope-9b-pt-res": ("16k", "131k")}[base.id]:
        assert sorted(base.canonical.l0[width]) == list(range(base.n_layers))  # every layer has one


def test_canonical_release_is_a_known_release_name():
    with pytest.raises(UnknownReleaseError) as err:
        get_release("gemma-scope-2b-pt-res-canonicl")
    message = str(err.value)
    assert "Did you mean gemma-scope-2b-pt-res-canonical" in message
    assert "gemma-scope-9b-pt-res-canonical" in message.split("Known releases:")[1]
    assert "planted-gemma-canonical" in message.split("Known releases:")[1]


def test_unknown_canonical_ids_name_the_nearest():
    with pytest.raises(UnknownReleaseError) as err:
        parse_key("gemma-scope-2b-pt-res-canonical:layer_12/width_131k/canonical")  # 131k is a 9b width
    message = str(err.value)
    assert message.startswith(
        "Unknown canonical SAE id 'layer_12/width_131k/canonical' of release "
        "'gemma-scope-2b-pt-res-canonical'. Did you mean "
    )
    assert "layer_12/width_16k/canonical" in message.split("?")[0]
    assert "width 16k at layers 0-25; width 65k at layers 0-25; width 1m at layers 5, 12, 19" in message
    with pytest.raises(UnknownReleaseError, match="Did you mean .*layer_25/width_16k/canonical"):
        parse_key("gemma-scope-2b-pt-res-canonical:layer_26/width_16k/canonical")
    with pytest.raises(UnknownReleaseError, match="or its canonical pattern 'layer_{layer}/width_{width}/canonical'"):
        parse_key("gemma-scope-9b-pt-res-canonical:layer_12/width_16k/canonicl")
    with pytest.raises(UnknownReleaseError, match="does not match release 'llama_scope_lxr_8x'"):
        parse_key("llama_scope_lxr_8x:layer_12/width_16k/canonical")  # no canonical alias there


def test_canonical_table_outside_the_model_is_rejected(tmp_path):
    path = tmp_path / "releases.yaml"
    path.write_text(
        "releases:\n  tiny:\n    sae_repo: a/b\n    model_repo: a/c\n    format: gemma_scope_npz\n"
        "    hook: resid_post\n    n_layers: 2\n    folder: 'layer_{layer}/average_l0_{l0}'\n"
        "    sae_id: 'layer_{layer}/average_l0_{l0}'\n"
        "    canonical: {release: tiny-canonical, sae_id: 'layer_{layer}/width_{width}/canonical', "
        "l0: {1k: [5, 6, 7]}}\n"
    )
    with pytest.raises(ValueError, match=r"releases.yaml: release 'tiny' is malformed: .*layers \[2\]"):
        load_registry(path)


def test_planted_canonical_ids_resolve_to_discovered_saes_offline(planted_cache):
    listing = discover_saes("planted-gemma", Hub(cache_dir=planted_cache, offline=True))
    canonical = listing.release.canonical
    assert canonical.release == "planted-gemma-canonical"
    refs = [parse_key(f"planted-gemma-canonical:{alias}") for alias in canonical.ids()]
    assert refs == listing.saes  # one canonical SAE per layer: exactly the planted folders
    assert [r.key for r in refs] == [f"planted-gemma:layer_{n}/width_512/average_l0_32" for n in range(6)]
    # the canonical release id names the same release (and so the same listing) as its base
    assert discover_saes("planted-gemma-canonical", Hub(cache_dir=planted_cache, offline=True)).saes == refs


GS2 = {
    "format": "gemma_scope_2_safetensors",
    "folder": "resid_post/layer_{layer}_width_{width}_l0_{sparsity}",
    "sae_id": "layer_{layer}_width_{width}_l0_{sparsity}",
}
GOOD = {
    "sae_repo": "a/b",
    "model_repo": "a/c",
    "format": "gemma_scope_npz",
    "hook": "resid_post",
    "n_layers": 2,
    "folder": "layer_{layer}/width_{width}/average_l0_{l0}",
    "sae_id": "layer_{layer}/width_{width}/average_l0_{l0}",
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"format": "gemma_scope_npzz"},
            r"field 'format': 'gemma_scope_npzz' is not one of .* Did you mean 'gemma_scope_npz'",
        ),
        (
            {"hook": "resid_pre"},
            r"field 'hook': 'resid_pre' is not one of \['resid_post'\]\. Did you mean 'resid_post'",
        ),
        (
            {"folder": "layer_{layer}/width_{width}/average_l0_{L0}"},
            r"field 'folder placeholder': 'L0' in .* Did you mean 'l0'",
        ),
        (
            {"sae_id": "layer_{layer}/width_{width}"},
            r"field 'sae_id' .* uses the fields \['layer', 'width'\] but 'folder' .* "
            r"differing only in \['l0'\] would get one id",
        ),
        ({"neuronpedia": "m/{layer}-res-{widht}"}, r"field 'neuronpedia placeholder': 'widht' .* Did you mean 'width'"),
        (
            {"formt": "gemma_scope_npz"},
            r"field 'name': 'formt' \(a release field\) is not one of .* Did you mean 'format'",
        ),
        (
            {"folder": "width_{width}/average_l0_{l0}", "sae_id": "width_{width}/average_l0_{l0}"},
            r"field 'folder' .* has no \{layer\}",
        ),
        ({"sparsity_l0": {"small": [10, 20]}}, r"field 'sparsity_l0' needs a \{sparsity\} in 'folder'"),
        ({**GS2, "sparsity_l0": {"small": {5: 10}}}, r"sparsity_l0 table names layers \[5\] outside the model's 2"),
        (
            {**GS2, "neuronpedia_only": {"sparsty": "medium"}},
            r"field 'neuronpedia_only field': 'sparsty' .* Did you mean 'sparsity'",
        ),
        (
            {"folder": "layer_{layer}/width_{width}/average_l0_{l0}[_seed_{sed}]"},
            r"field 'folder placeholder': 'sed' in .* Did you mean 'seed'",
        ),
    ],
)
def test_each_registry_mistake_is_refused_at_load_naming_file_release_and_field(tmp_path, change, message):
    path = tmp_path / "releases.yaml"
    path.write_text(yaml.safe_dump({"releases": {"tiny": {**GOOD, **change}}}))
    with pytest.raises(ValueError, match=r"releases.yaml: release 'tiny' is malformed: " + message):
        load_registry(path)


def test_good_entry_loads(tmp_path):
    path = tmp_path / "releases.yaml"
    path.write_text(yaml.safe_dump({"releases": {"tiny": GOOD}}))
    assert load_registry(path)["tiny"].sae("layer_1/width_1k/average_l0_5").layer == 1


def test_n_layers_is_checked_against_the_models_config(planted_cache, monkeypatch):
    real = get_release("planted-llama")  # 8 layers; a registry entry saying 9 would pair layer 7 with a layer 8
    monkeypatch.setattr("core.weights.discovery.get_release", lambda _: dataclasses.replace(real, n_layers=9))
    with pytest.raises(
        WeightFileError,
        match=r"config.json.*the model has 8 layers but release 'planted-llama' "
        r"in .*releases.yaml says n_layers: 9",
    ):
        fetch_model("planted-llama", Hub(cache_dir=planted_cache, offline=True))
