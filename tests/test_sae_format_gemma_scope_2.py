"""Gemma Scope 2 reader (``params.safetensors``, lower-case names) on files written in that layout, and every
kind of bad file refused with the file named — the same cases ``tests/test_sae_formats.py`` checks for the
other formats."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from core.errors import WeightFileError
from core.weights.sae_formats import FORMATS

pytestmark = pytest.mark.unit

D_MODEL, D_SAE = 8, 24
FORMAT = FORMATS["gemma_scope_2_safetensors"]


def tensors(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w_dec = torch.randn(D_SAE, D_MODEL, generator=g)
    return {
        "w_enc": torch.randn(D_MODEL, D_SAE, generator=g).to(dtype),
        "w_dec": (w_dec / w_dec.norm(dim=1, keepdim=True)).to(dtype),
        "b_enc": torch.randn(D_SAE, generator=g).to(dtype),
        "b_dec": torch.randn(D_MODEL, generator=g).to(dtype),
        "threshold": torch.rand(D_SAE, generator=g).to(dtype),
    }


def write(folder, data) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(data, str(folder / "params.safetensors"))


def test_round_trip_renames_and_keeps_orientation(tmp_path):
    data = tensors()
    write(tmp_path, {**data, "affine_skip_connection": torch.zeros(D_MODEL, D_MODEL)})  # transcoder extra: ignored
    sae = FORMAT.read(tmp_path, d_model=D_MODEL)
    assert (sae.d_model, sae.d_sae) == (D_MODEL, D_SAE)
    for theirs, ours in (
        ("w_enc", "W_enc"),
        ("w_dec", "W_dec"),
        ("b_enc", "b_enc"),
        ("b_dec", "b_dec"),
        ("threshold", "threshold"),
    ):
        assert torch.equal(getattr(sae, ours), data[theirs])
    torch.testing.assert_close(sae.decoder_norms, torch.ones(D_SAE))
    assert sae.source.endswith("params.safetensors") and FORMAT.files == ("params.safetensors",)


def test_bfloat16_file_is_read_as_float32(tmp_path):
    write(tmp_path, tensors(torch.bfloat16))
    sae = FORMAT.read(tmp_path)
    assert sae.W_enc.dtype == torch.float32
    assert torch.equal(sae.W_enc, tensors(torch.bfloat16)["w_enc"].float())


def test_truncated_file_names_the_file(tmp_path):
    write(tmp_path, tensors())
    path = tmp_path / "params.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightFileError, match="params.safetensors: unreadable safetensors"):
        FORMAT.read(tmp_path)


@pytest.mark.parametrize(
    "name, value, problem",
    [
        ("w_dec", torch.ones(D_SAE + 1, D_MODEL), r"W_dec has shape \(25, 8\), expected \(24, 8\)"),
        ("w_enc", torch.ones(D_MODEL * D_SAE), "W_enc must be 2-D"),
        ("b_dec", torch.zeros(D_MODEL + 2), "b_dec has shape"),
        ("threshold", torch.full((D_SAE,), float("nan")), "threshold has 24 NaN/Inf values"),
        ("w_enc", torch.full((D_MODEL, D_SAE), float("inf")), "W_enc has 192 NaN/Inf values"),
        ("b_enc", torch.ones(D_SAE, dtype=torch.int32), "b_enc has dtype torch.int32"),
        ("w_dec", torch.zeros(D_SAE, D_MODEL), "W_dec has all-zero rows"),
    ],
)
def test_bad_tensors_are_refused(tmp_path, name, value, problem):
    write(tmp_path, {**tensors(), name: value})
    with pytest.raises(WeightFileError, match=problem) as err:
        FORMAT.read(tmp_path)
    assert "params.safetensors" in str(err.value)


def test_missing_or_gemma_scope_1_names_and_wrong_model_width(tmp_path):
    data = tensors()
    write(tmp_path / "a", {k: v for k, v in data.items() if k != "threshold"})
    with pytest.raises(WeightFileError, match=r"missing tensors \['threshold'\]"):
        FORMAT.read(tmp_path / "a")
    write(tmp_path / "b", {"W_enc" if k == "w_enc" else k: v for k, v in data.items()})  # Gemma Scope 1 spelling
    with pytest.raises(WeightFileError, match=r"missing tensors \['w_enc'\]"):
        FORMAT.read(tmp_path / "b")
    write(tmp_path / "c", data)
    with pytest.raises(WeightFileError, match="does not match the model's hidden size 16"):
        FORMAT.read(tmp_path / "c", d_model=16)
    with pytest.raises(WeightFileError, match="params.safetensors: file not found"):
        FORMAT.read(tmp_path / "absent")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cut=st.integers(min_value=0, max_value=3000),
    flip=st.integers(min_value=0, max_value=3000),
    header=st.binary(max_size=32),
    length=st.one_of(st.none(), st.integers(min_value=0, max_value=2**40)),
)
def test_mutated_bytes_never_crash_uncleanly(tmp_path, cut, flip, header, length):
    """Any truncation, byte flip or garbage header gives valid weights or a WeightFileError naming the file."""
    write(tmp_path, tensors())
    path = tmp_path / "params.safetensors"
    data = bytearray(path.read_bytes())
    if length is not None:
        data = bytearray(length.to_bytes(8, "little") + header) + data[8:]
    data = data[: max(0, len(data) - cut)]
    if data and flip < len(data):
        data[flip] ^= 0xFF
    path.write_bytes(bytes(data))
    try:
        sae = FORMAT.read(tmp_path)
    except WeightFileError as err:
        assert "params.safetensors" in str(err)
    else:
        assert sae.W_enc.shape == (D_MODEL, D_SAE) and bool(torch.isfinite(sae.W_enc).all())
        assert np.isfinite(sae.threshold.numpy()).all()


def test_registry_entry_uses_saelens_ids_and_the_hub_folder_layout():
    """gemma-scope-2-1b-pt-res: SAELens ids ``layer_{L}_width_{W}_l0_{bucket}[_seed_{seed}]`` in ``resid_post/``
    folders (the every-layer ``resid_post_all/`` folders belong to the -res-all release, not matched here)."""
    from core.registry import UnknownReleaseError, get_release

    release = get_release("gemma-scope-2-1b-pt-res")
    assert (release.format, release.sae_repo, release.model_repo) == (
        "gemma_scope_2_safetensors",
        "google/gemma-scope-2-1b-pt",
        "google/gemma-3-1b-pt",
    )
    ref = release.sae("layer_13_width_16k_l0_medium")
    assert (ref.layer, ref.width, ref.folder) == (13, "16k", "resid_post/layer_13_width_16k_l0_medium")
    listing = [
        f"resid_post/layer_{n}_width_{w}_l0_{b}/params.safetensors"
        for n in (7, 22)
        for w in ("16k", "1m")
        for b in ("small", "big")
    ]
    listing += [
        "resid_post/layer_7_width_262k_l0_medium_seed_1/params.safetensors",
        "resid_post_all/layer_3_width_16k_l0_small/params.safetensors",
        "resid_post/layer_7_width_16k_l0_small/config.json",
    ]
    found = release.discover(listing, FORMAT.files[0])
    assert [r.sae_id for r in found][:2] == ["layer_7_width_16k_l0_small", "layer_7_width_16k_l0_big"]
    assert len(found) == 9 and {r.layer for r in found} == {7, 22}
    assert "layer_7_width_262k_l0_medium_seed_1" in {r.sae_id for r in found}
    with pytest.raises(UnknownReleaseError, match="does not match"):
        release.sae("layer_13/width_16k/average_l0_82")  # a Gemma Scope 1 id
    with pytest.raises(UnknownReleaseError, match="outside release"):
        release.sae("layer_26_width_16k_l0_small")  # gemma-3-1b has 26 layers


def _ref(layer: int = 7, width: str = str(D_SAE)):
    from core.registry import SaeRef

    sae_id = f"layer_{layer}_width_{width}_l0_small"
    return SaeRef("gemma-scope-2-1b-pt-res", sae_id, f"resid_post/{sae_id}", layer, width)


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        (None, None),  # no config.json: nothing more to check
        (
            {"architecture": "jump_relu", "model_name": "gemma-3-1b-pt", "hf_hook_point_in": "model.layers.7.output"},
            None,
        ),
        ({"architecture": "jump_relu", "hf_hook_point_in": "model.layers.8.output"}, r"says \{'hf_hook_point_in'"),
        ({"architecture": "topk", "hf_hook_point_in": "model.layers.7.output"}, r"says \{'architecture': 'topk'\}"),
        ("{not json", "is not readable JSON"),
    ],
)
def test_a_folders_config_json_is_checked_against_the_sae_id(tmp_path, config, problem):
    import json

    from core.weights.discovery import check_sae_files

    write(tmp_path, tensors())
    if config is not None:
        (tmp_path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    sae = FORMAT.read(tmp_path, d_model=D_MODEL)
    if problem is None:
        check_sae_files(_ref(), sae, tmp_path)
    else:
        with pytest.raises(WeightFileError, match=r"config.json: " + problem):
            check_sae_files(_ref(), sae, tmp_path)


def test_a_width_label_that_is_not_the_files_width_is_refused(tmp_path):
    from core.weights.discovery import check_sae_files, width_matches

    real = {"4k": 4096, "16k": 16384, "32k": 32768, "65k": 65536, "131k": 131072, "262k": 262144, "1m": 1 << 20}
    assert all(width_matches(label, n) for label, n in real.items()) and width_matches("512", 512)
    assert not width_matches("16k", 24) and not width_matches("512", 511) and width_matches("8x", 8) is None
    write(tmp_path, tensors())
    with pytest.raises(WeightFileError, match=rf"params.safetensors: holds {D_SAE} latents but SAE .* says width 16k"):
        check_sae_files(_ref(width="16k"), FORMAT.read(tmp_path, d_model=D_MODEL), tmp_path)
