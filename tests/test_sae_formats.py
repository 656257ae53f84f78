"""SAE readers on files written in the real formats, and every kind of bad file refused clearly."""

from __future__ import annotations

import io
import json
import math
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from core.errors import WeightFileError
from core.weights.sae_formats import FORMATS, SaeWeights

pytestmark = pytest.mark.unit

D_MODEL, D_SAE = 8, 24


def gemma_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    W_dec = rng.standard_normal((D_SAE, D_MODEL)).astype(np.float32)
    return {
        "W_enc": rng.standard_normal((D_MODEL, D_SAE)).astype(np.float32),
        "W_dec": W_dec / np.linalg.norm(W_dec, axis=1, keepdims=True),
        "b_enc": rng.standard_normal(D_SAE).astype(np.float32),
        "b_dec": rng.standard_normal(D_MODEL).astype(np.float32),
        "threshold": rng.random(D_SAE).astype(np.float32),
    }


def write_gemma(folder, arrays) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "params.npz", **arrays)


def write_llama(folder, tensors, hp) -> None:
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "checkpoints" / "final.safetensors"))
    (folder / "hyperparams.json").write_text(json.dumps(hp))


def llama_parts(avg_norm: float = 2.0) -> tuple[dict[str, torch.Tensor], dict]:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "encoder.weight": torch.randn(D_SAE, D_MODEL, generator=g).bfloat16(),
        "encoder.bias": torch.randn(D_SAE, generator=g).bfloat16(),
        "decoder.weight": (1.5 * torch.randn(D_MODEL, D_SAE, generator=g)).bfloat16(),
        "decoder.bias": torch.randn(D_MODEL, generator=g).bfloat16(),
    }
    hp = {
        "d_model": D_MODEL,
        "d_sae": D_SAE,
        "act_fn": "jumprelu",
        "jump_relu_threshold": 0.5,
        "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": avg_norm, "out": avg_norm},
        "hook_point_in": "blocks.3.hook_resid_post",
        "hook_point_out": "blocks.3.hook_resid_post",
    }
    return tensors, hp


def test_gemma_scope_npz_round_trip(tmp_path):
    arrays = gemma_arrays(np.random.default_rng(0))
    write_gemma(tmp_path, arrays)
    sae = FORMATS["gemma_scope_npz"].read(tmp_path, d_model=D_MODEL)
    assert (sae.d_model, sae.d_sae) == (D_MODEL, D_SAE)
    for name, value in arrays.items():
        np.testing.assert_array_equal(getattr(sae, name).numpy(), value)
    torch.testing.assert_close(sae.decoder_norms, torch.ones(D_SAE))
    torch.testing.assert_close(sae.encoder_directions().norm(dim=1), torch.ones(D_SAE))
    assert sae.source.endswith("params.npz")


def test_llama_scope_is_read_in_saelens_convention(tmp_path):
    """W_enc·s, W_dec/s, b_dec/s, threshold θ·s with s = sqrt(d_model) / dataset_average_activation_norm.in
    (SAELens' fold_activation_norm_scaling_factor + its Llama Scope config reader), computed in float32."""
    tensors, hp = llama_parts(avg_norm=2.0)
    write_llama(tmp_path, tensors, hp)
    sae = FORMATS["llama_scope_safetensors"].read(tmp_path, d_model=D_MODEL)
    s = math.sqrt(D_MODEL) / 2.0
    torch.testing.assert_close(sae.W_enc, tensors["encoder.weight"].float().T * s, rtol=0, atol=0)
    torch.testing.assert_close(sae.W_dec, tensors["decoder.weight"].float().T / s, rtol=0, atol=0)
    torch.testing.assert_close(sae.b_enc, tensors["encoder.bias"].float(), rtol=0, atol=0)
    torch.testing.assert_close(sae.b_dec, tensors["decoder.bias"].float() / s, rtol=0, atol=0)
    torch.testing.assert_close(sae.threshold, torch.full((D_SAE,), 0.5 * s), rtol=0, atol=0)
    assert sae.W_enc.dtype == torch.float32
    # decoder norms are in model units (file norms / s, not 1), directions are unit and unchanged by the fold
    torch.testing.assert_close(sae.decoder_norms, tensors["decoder.weight"].float().norm(dim=0) / s)
    assert not torch.allclose(sae.decoder_norms, torch.ones(D_SAE), atol=0.1)
    torch.testing.assert_close(sae.decoder_directions().norm(dim=1), torch.ones(D_SAE))


def test_llama_scope_fold_keeps_the_sae_function_in_model_units(tmp_path):
    """On a residual vector x the folded SAE has the file SAE's pre-activations on s·x, and its reconstruction is the
    file SAE's mapped back to model units (lm_saes: x̂ = (W_dec_file f + b_dec_file) / s)."""
    tensors, hp = llama_parts(avg_norm=5.0)
    write_llama(tmp_path, tensors, hp)
    sae = FORMATS["llama_scope_safetensors"].read(tmp_path)
    s = math.sqrt(D_MODEL) / 5.0
    raw = {k: v.float() for k, v in tensors.items()}
    x = torch.randn(16, D_MODEL, generator=torch.Generator().manual_seed(1))
    pre_file = (s * x) @ raw["encoder.weight"].T + raw["encoder.bias"]
    torch.testing.assert_close(x @ sae.W_enc + sae.b_enc, pre_file)
    f = torch.relu(pre_file)
    torch.testing.assert_close(f @ sae.W_dec + sae.b_dec, (f @ raw["decoder.weight"].T + raw["decoder.bias"]) / s)


@pytest.mark.parametrize("norm_activation", ["inference", None])
def test_llama_scope_without_dataset_wise_norm_is_not_scaled(tmp_path, norm_activation):
    tensors, hp = llama_parts(avg_norm=2.0)
    hp = {k: v for k, v in hp.items() if k != "norm_activation"}
    if norm_activation is not None:
        hp["norm_activation"] = norm_activation
    write_llama(tmp_path, tensors, hp)
    sae = FORMATS["llama_scope_safetensors"].read(tmp_path)
    torch.testing.assert_close(sae.W_dec, tensors["decoder.weight"].float().T, rtol=0, atol=0)
    torch.testing.assert_close(sae.threshold, torch.full((D_SAE,), 0.5), rtol=0, atol=0)


@pytest.mark.parametrize("avg_norm", [0.0, -2.0, float("inf")])
def test_llama_scope_refuses_a_non_positive_input_scale(tmp_path, avg_norm):
    tensors, hp = llama_parts(avg_norm=avg_norm)
    write_llama(tmp_path, tensors, hp)
    with pytest.raises(WeightFileError, match="hyperparams.json: missing or malformed hyperparameter"):
        FORMATS["llama_scope_safetensors"].read(tmp_path)


def test_truncated_npz_names_the_file(tmp_path):
    write_gemma(tmp_path, gemma_arrays(np.random.default_rng(0)))
    path = tmp_path / "params.npz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(WeightFileError, match="params.npz: unreadable npz"):
        FORMATS["gemma_scope_npz"].read(tmp_path)


def test_pickled_object_in_npz_is_refused_not_unpickled(tmp_path):
    arrays = gemma_arrays(np.random.default_rng(0))
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    obj = np.empty(1, dtype=object)
    obj[0] = Payload()
    write_gemma(tmp_path, {**arrays, "threshold": obj})
    with pytest.raises(WeightFileError, match="params.npz"):
        FORMATS["gemma_scope_npz"].read(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "name, value, problem",
    [
        ("W_dec", np.zeros((D_SAE + 1, D_MODEL), np.float32) + 1, "W_dec has shape"),
        ("b_dec", np.zeros(D_MODEL + 2, np.float32), "b_dec has shape"),
        ("threshold", np.full(D_SAE, np.nan, np.float32), "threshold has 24 NaN/Inf"),
        ("W_enc", np.ones((D_MODEL, D_SAE), np.int32), "W_enc has dtype torch.int32"),
    ],
)
def test_bad_arrays_are_refused(tmp_path, name, value, problem):
    write_gemma(tmp_path, {**gemma_arrays(np.random.default_rng(0)), name: value})
    with pytest.raises(WeightFileError, match=problem):
        FORMATS["gemma_scope_npz"].read(tmp_path)


def test_missing_array_and_wrong_model_width(tmp_path):
    arrays = gemma_arrays(np.random.default_rng(0))
    write_gemma(tmp_path / "a", {k: v for k, v in arrays.items() if k != "threshold"})
    with pytest.raises(WeightFileError, match=r"missing arrays \['threshold'\]"):
        FORMATS["gemma_scope_npz"].read(tmp_path / "a")
    write_gemma(tmp_path / "b", arrays)
    with pytest.raises(WeightFileError, match="does not match the model's hidden size 16"):
        FORMATS["gemma_scope_npz"].read(tmp_path / "b", d_model=16)


def test_missing_sae_folder(tmp_path):
    with pytest.raises(WeightFileError, match="file not found"):
        FORMATS["gemma_scope_npz"].read(tmp_path / "layer_99")
    with pytest.raises(WeightFileError, match="hyperparams.json: file not found"):
        FORMATS["llama_scope_safetensors"].read(tmp_path / "L99")


def test_llama_scope_bad_files(tmp_path):
    tensors, hp = llama_parts()
    write_llama(tmp_path, tensors, {k: v for k, v in hp.items() if k != "jump_relu_threshold"})
    with pytest.raises(WeightFileError, match="hyperparams.json: missing or malformed hyperparameter"):
        FORMATS["llama_scope_safetensors"].read(tmp_path)
    write_llama(tmp_path, tensors, hp)
    weights = tmp_path / "checkpoints" / "final.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(WeightFileError, match="final.safetensors: unreadable safetensors"):
        FORMATS["llama_scope_safetensors"].read(tmp_path)
    write_llama(tmp_path, {k: v for k, v in tensors.items() if k != "decoder.bias"}, hp)
    with pytest.raises(WeightFileError, match=r"missing tensors \['decoder.bias'\]"):
        FORMATS["llama_scope_safetensors"].read(tmp_path)
    write_llama(tmp_path, tensors, {**hp, "d_sae": D_SAE * 2})
    with pytest.raises(WeightFileError, match="has d_sae 24 but hyperparams.json says 48"):
        FORMATS["llama_scope_safetensors"].read(tmp_path)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=4000), flip=st.integers(min_value=0, max_value=4000))
def test_mutated_npz_bytes_never_crash_uncleanly(tmp_path, cut, flip):
    """Any truncation or byte flip gives either valid weights or a WeightFileError naming the file."""
    buffer = io.BytesIO()
    np.savez(buffer, **gemma_arrays(np.random.default_rng(0)))
    data = bytearray(buffer.getvalue())
    data = data[: max(0, len(data) - cut)]
    if data and flip < len(data):
        data[flip] ^= 0xFF
    (tmp_path / "params.npz").write_bytes(bytes(data))
    try:
        sae = FORMATS["gemma_scope_npz"].read(tmp_path)
    except WeightFileError as err:
        assert "params.npz" in str(err)
    else:
        assert sae.W_enc.shape == (D_MODEL, D_SAE)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.binary(min_size=0, max_size=64), length=st.integers(min_value=0, max_value=2**40))
def test_mutated_safetensors_header_never_crashes_uncleanly(tmp_path, header, length):
    """A safetensors file with a garbage header (any declared length) is refused with the file named."""
    tensors, hp = llama_parts()
    write_llama(tmp_path, tensors, hp)
    weights = tmp_path / "checkpoints" / "final.safetensors"
    body = weights.read_bytes()
    weights.write_bytes(length.to_bytes(8, "little") + header + body[8:])
    try:
        FORMATS["llama_scope_safetensors"].read(tmp_path)
    except WeightFileError as err:
        assert "final.safetensors" in str(err)


def test_zip_without_npy_members(tmp_path):
    with zipfile.ZipFile(tmp_path / "params.npz", "w") as zf:
        zf.writestr("W_enc.txt", "not an array")
    with pytest.raises(WeightFileError, match="missing arrays"):
        FORMATS["gemma_scope_npz"].read(tmp_path)


@pytest.mark.parametrize("stored", ["rows", "transposed"])
def test_encoder_directions_are_a_copy_whatever_the_layout_of_w_enc(stored):
    """Unit rows e_i = W_enc[:, i] / ||W_enc[:, i]||, and W_enc untouched — also when it is stored transposed (a view
    whose transpose is contiguous), where normalising 'a contiguous transpose' in place would rewrite the SAE."""
    gen = torch.Generator().manual_seed(0)
    w_enc = torch.randn(D_MODEL, D_SAE, generator=gen) * 3
    if stored == "transposed":
        w_enc = w_enc.T.contiguous().T
    before = w_enc.clone()
    sae = SaeWeights(
        w_enc,
        torch.randn(D_SAE, D_MODEL, generator=gen),
        torch.zeros(D_SAE),
        torch.zeros(D_MODEL),
        torch.zeros(D_SAE),
        "test",
    )
    rows = sae.encoder_directions()
    assert torch.equal(sae.W_enc, before) and rows.is_contiguous()
    assert torch.equal(rows, (before / before.norm(dim=0)).T)
