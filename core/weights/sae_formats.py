"""SAE weight formats behind one interface: each format reads a folder into ``SaeWeights``.

Conventions of ``SaeWeights`` (SAELens' ``W_enc``/``W_dec`` orientation), whatever the file layout:
``W_enc (d_model, d_sae)``, ``W_dec (d_sae, d_model)``, ``b_enc (d_sae)``, ``b_dec (d_model)``,
``threshold (d_sae)`` (JumpReLU: feature i fires when ``x·W_enc[:, i] + b_enc[i] > threshold[i]``), all
float32 on CPU, in model units (x is the raw residual stream; SAELens' tensors after ``from_pretrained``). The
decoder keeps its row norms (not normalised to 1) — unit directions go to the interaction math and the norms to the
magnitude analysis.

Formats:
- Gemma Scope (``google/gemma-scope-*``): ``params.npz`` with exactly those five float32 arrays, decoder
  rows unit-norm by training. Read with ``allow_pickle=False``: a pickled object is refused.
- Gemma Scope 2 (``google/gemma-scope-2-*``, SAEs of Gemma 3 models): ``params.safetensors`` with the same five
  arrays in the same orientation but lower-case weight names — ``w_enc (d_model, d_sae)``, ``w_dec (d_sae, d_model)``,
  ``b_enc``, ``b_dec``, ``threshold`` (per-feature JumpReLU) — as SAELens' ``gemma_3_sae_huggingface_loader`` reads
  them (decoderesearch/SAELens ``sae_lens/loading/pretrained_sae_loaders.py``: ``W_enc = raw["w_enc"]`` etc., no
  input normalisation, ``apply_b_dec_to_input: False``). Transcoder folders add ``affine_skip_connection``, which
  is not read. The stored dtype is not pinned here (SAELens casts to float32); any float dtype is accepted.
- Llama Scope (``fnlp/Llama3_1-8B-Base-L*``): ``checkpoints/final.safetensors`` (bf16, PyTorch Linear
  layout ``encoder.weight [d_sae, d_model]``, ``decoder.weight [d_model, d_sae]``) and ``hyperparams.json``.
  The SAE was trained on inputs scaled by ``s = sqrt(d_model) / dataset_average_activation_norm["in"]``
  (``norm_activation: dataset-wise``: OpenMOSS lm_saes' ``compute_norm_factor``). Read in SAELens' convention, so
  every tensor is in model (residual-stream) units::

      W_enc = encoder.weightᵀ · s      b_enc = encoder.bias
      W_dec = decoder.weightᵀ / s      b_dec = decoder.bias / s      threshold = jump_relu_threshold · s (every i)

  Source (decoderesearch/SAELens, checked in sae-lens 6.54.12): ``SAE.fold_activation_norm_scaling_factor(s)``
  (``sae_lens/saes/sae.py``: ``W_enc *= s; W_dec /= s; b_dec /= s``), which ``SAE.from_pretrained`` applies to
  Llama Scope SAEs (their config reader sets ``normalize_activations: expected_average_only_in``; s is the
  ``norm_scaling_factor`` listed per SAE in ``pretrained_saes.yaml``), and ``get_llama_scope_config_from_hf``
  (``sae_lens/loading/pretrained_sae_loaders.py``), which sets the scalar threshold to ``jump_relu_threshold · s``
  with s from hyperparams.json (decoderesearch/SAELens PR 483, "Fix abnormally large llamascope L0", by Hzfinfdu, a
  Llama Scope author: an empirical fix for too-large L0s, the cause left unidentified there). So the encoder reads the
  raw residual stream, ``x·W_enc + b_enc`` is the trained pre-activation of ``s·x``, and ``W_dec`` rows (file norms
  ≈ 1.5, so ≈ 1.5/s here) map feature activations back into the residual stream: decoder norms are in model units,
  comparable across layers and with other releases. SAELens reads no ``norm_activation`` (its config reader needs
  ``dataset_average_activation_norm`` and always scales the threshold); here s is applied only when
  ``norm_activation`` is ``dataset-wise`` and is 1 otherwise (lm_saes sets ``inference`` once its
  ``standardize_parameters_of_dataset_norm`` has folded s itself). Real Llama Scope files are dataset-wise, so the
  two agree on them. ``sparsity_include_decoder_norm: true`` (lm_saes gates on ``hidden_pre · ||decoder row|| >
  jump_relu_threshold``) is read by neither: SAELens ignores it and so does this reader — the threshold is SAELens'
  scalar, kept for comparison with SAELens and Neuronpedia; no weight-only statistic here reads it.
"""

from __future__ import annotations

import contextlib
import json
import math
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from core.errors import WeightFileError


@dataclass(frozen=True)
class SaeWeights:
    """One SAE's parameters in SAELens orientation (see module docstring), float32."""

    W_enc: torch.Tensor
    W_dec: torch.Tensor
    b_enc: torch.Tensor
    b_dec: torch.Tensor
    threshold: torch.Tensor
    source: str  # the file the weights came from

    @property
    def d_model(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def encoder_norms(self) -> torch.Tensor:
        """||W_enc[:, i]||, shape (d_sae,)."""
        return self.W_enc.norm(dim=0)

    @property
    def decoder_norms(self) -> torch.Tensor:
        """||W_dec[i]||, shape (d_sae,)."""
        return self.W_dec.norm(dim=1)

    def decoder_directions(self) -> torch.Tensor:
        """Unit decoder directions d_i = W_dec[i] / ||W_dec[i]||, shape (d_sae, d_model)."""
        return self.W_dec / self.decoder_norms.clamp_min(torch.finfo(torch.float32).tiny)[:, None]

    def encoder_directions(self) -> torch.Tensor:
        """Unit encoder directions e_i = W_enc[:, i] / ||W_enc[:, i]||, as rows (d_sae, d_model): a transposed copy
        (always a copy: ``contiguous`` would hand back W_enc itself when it is stored transposed), divided in place —
        one copy of W_enc's size, not two."""
        rows = self.W_enc.T.clone(memory_format=torch.contiguous_format)
        return rows.div_(self.encoder_norms.clamp_min(torch.finfo(torch.float32).tiny)[:, None])


GEMMA_SCOPE_2_CONFIG = "config.json"  # per folder: architecture, model_name, hf_hook_point_in (SAELens' Gemma 3 loader)


class SaeFormat(Protocol):
    """A weight format: the files an SAE folder holds (the first marks an SAE), those it may hold (fetched when
    present, checked by ``core.weights.discovery.check_sae_files``) and how to read them."""

    files: tuple[str, ...]
    optional_files: tuple[str, ...]

    def read(self, folder: Path, d_model: int | None = None) -> SaeWeights:
        """Read and validate; ``d_model`` is the model's residual width the SAE must match."""
        ...


FINITE_CHUNK_ELEMENTS = 1 << 20  # elements per finiteness pass: 4 MiB of float32
FLOAT32_BLOCK_BYTES = 64 << 20  # float32 bytes per block of read_float32's conversion


def nonfinite_count(t: torch.Tensor, chunk_elements: int = FINITE_CHUNK_ELEMENTS) -> int:
    """Number of NaN/±Inf entries of ``t``, counted block by block along dim 0.

    ``torch.isfinite(x)`` is ``(x == x) * (x.abs() != inf)`` (ATen ``isfinite``): it allocates ``|x|`` and three
    bool masks, 1.75× a float32 tensor at once. Over blocks of whole rows of about ``chunk_elements`` entries
    (views, nothing copied) the extra memory is ~1.75 × 4 B × ``chunk_elements`` (7 MiB by default) — or one row's
    worth when a single row is longer than that.
    """
    rows = t.reshape(-1) if t.ndim <= 1 else t
    per_block = max(1, chunk_elements // max(1, rows[0].numel())) if len(rows) else 1
    return sum(int(torch.count_nonzero(~torch.isfinite(block))) for block in rows.split(per_block))


def validated(source: Path, tensors: dict[str, torch.Tensor], d_model: int | None = None) -> SaeWeights:
    """Check shapes, dtypes and finiteness of SAELens-oriented tensors; return float32 ``SaeWeights`` (taking the
    tensors out of ``tensors`` one at a time, so a tensor and its float32 copy are never all held at once).

    ``d_model``, when given, is the model's residual width the SAE must match.
    """
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise WeightFileError(source, f"{name} has dtype {t.dtype}, expected a floating-point type")
    W_enc = tensors["W_enc"]
    if W_enc.ndim != 2:
        raise WeightFileError(source, f"W_enc must be 2-D (d_model, d_sae), got shape {tuple(W_enc.shape)}")
    dm, ds = W_enc.shape
    expected = {"W_dec": (ds, dm), "b_enc": (ds,), "b_dec": (dm,), "threshold": (ds,)}
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise WeightFileError(
                source, f"{name} has shape {tuple(tensors[name].shape)}, expected {shape} given W_enc {(dm, ds)}"
            )
    if d_model is not None and dm != d_model:
        raise WeightFileError(source, f"SAE d_model {dm} does not match the model's hidden size {d_model}")
    out = {name: tensors.pop(name).to(torch.float32).contiguous() for name in list(tensors)}  # one copy at a time
    for name, t in out.items():
        bad = nonfinite_count(t)
        if bad:
            raise WeightFileError(source, f"{name} has {bad} NaN/Inf values")
    if bool((out["W_dec"].norm(dim=1) == 0).any()):
        raise WeightFileError(source, "W_dec has all-zero rows (dead features cannot be given a direction)")
    return SaeWeights(source=str(source), **out)


class GemmaScopeNpz:
    """Gemma Scope ``params.npz`` (see module docstring)."""

    files: tuple[str, ...] = ("params.npz",)
    optional_files: tuple[str, ...] = ()
    names = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")

    def read(self, folder: Path, d_model: int | None = None) -> SaeWeights:
        path = folder / self.files[0]
        try:
            with np.load(path, allow_pickle=False) as npz:
                missing = [n for n in self.names if n not in npz.files]
                if missing:
                    raise WeightFileError(path, f"missing arrays {missing} (has {sorted(npz.files)})")
                arrays = {n: torch.from_numpy(np.array(npz[n])) for n in self.names}
        except WeightFileError:
            raise
        except FileNotFoundError as exc:
            raise WeightFileError(path, "file not found") from exc
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
            raise WeightFileError(path, f"unreadable npz ({type(exc).__name__}: {exc})") from exc
        return validated(path, arrays, d_model)


class GemmaScope2Safetensors:
    """Gemma Scope 2 ``params.safetensors`` (see module docstring): Gemma Scope's arrays under lower-case names."""

    files: tuple[str, ...] = ("params.safetensors",)
    optional_files: tuple[str, ...] = (GEMMA_SCOPE_2_CONFIG,)
    names = {"w_enc": "W_enc", "w_dec": "W_dec", "b_enc": "b_enc", "b_dec": "b_dec", "threshold": "threshold"}

    def read(self, folder: Path, d_model: int | None = None) -> SaeWeights:
        path = folder / self.files[0]
        raw = read_safetensors(path, list(self.names))
        return validated(path, {ours: raw[theirs] for theirs, ours in self.names.items()}, d_model)


class LlamaScopeSafetensors:
    """Llama Scope ``checkpoints/final.safetensors`` + ``hyperparams.json``, SAELens' convention (module docstring)."""

    files: tuple[str, ...] = ("checkpoints/final.safetensors", "hyperparams.json")
    optional_files: tuple[str, ...] = ()

    def read(self, folder: Path, d_model: int | None = None) -> SaeWeights:
        weights_path, hp_path = (folder / f for f in self.files)
        hp = read_json(hp_path)
        try:
            hp_d_model = int(hp["d_model"])
            threshold = float(hp["jump_relu_threshold"])
            s = llama_scope_input_scale(hp)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            raise WeightFileError(hp_path, f"missing or malformed hyperparameter: {exc!r}") from exc
        names = ["encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"]
        raw = read_safetensors(weights_path, names)
        d_sae = raw["encoder.bias"].shape[0] if raw["encoder.bias"].ndim == 1 else -1

        def scaled(name: str, times: float = 1.0, over: float = 1.0, transpose: bool = False) -> torch.Tensor:
            """``name`` taken out of ``raw`` (transposed in the file's dtype, half a float32 copy's bytes), as
            float32, scaled in place — in float32 (not in the file's bf16), as SAELens does after its cast."""
            t = raw.pop(name)
            t = t.T.contiguous() if transpose else t
            return t.float().mul_(times).div_(over) if t.is_floating_point() else t

        tensors = {
            "W_enc": scaled("encoder.weight", times=s, transpose=True),
            "W_dec": scaled("decoder.weight", over=s, transpose=True),
            "b_enc": scaled("encoder.bias"),
            "b_dec": scaled("decoder.bias", over=s),
            "threshold": torch.full((max(d_sae, 0),), threshold * s),
        }
        if hp.get("d_sae") is not None and int(hp["d_sae"]) != d_sae:
            raise WeightFileError(weights_path, f"has d_sae {d_sae} but {hp_path.name} says {hp['d_sae']}")
        if d_model is not None and hp_d_model != d_model:
            raise WeightFileError(hp_path, f"d_model {hp_d_model} does not match the model's hidden size {d_model}")
        return validated(weights_path, tensors, d_model=hp_d_model)


def llama_scope_input_scale(hp: dict) -> float:
    """The input scale s of a Llama Scope SAE (dimensionless): the SAE saw ``s·x`` for a residual vector x.

    ``s = sqrt(d_model) / dataset_average_activation_norm["in"]`` when ``norm_activation`` is ``dataset-wise``
    (lm_saes' ``compute_norm_factor``; SAELens' ``norm_scaling_factor``, 58.9 at layer 0 to 0.86 at layer 31 of
    LXR-8x), else 1. Raises KeyError/TypeError/ValueError/ZeroDivisionError on a malformed entry, ValueError on a
    scale that is not finite and positive (a negative norm would flip every direction).
    """
    if hp.get("norm_activation") != "dataset-wise":
        return 1.0
    s = math.sqrt(int(hp["d_model"])) / float(hp["dataset_average_activation_norm"]["in"])
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"input scale sqrt(d_model) / dataset_average_activation_norm.in = {s} is not finite and > 0")
    return s


def read_json(path: Path) -> dict:
    """A JSON object from a file, or a WeightFileError naming the file."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise WeightFileError(path, "file not found") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightFileError(path, f"unreadable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise WeightFileError(path, f"expected a JSON object, got {type(data).__name__}")
    return data


def read_safetensors(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Only the named tensors of a safetensors file (memory-mapped read), with file-naming errors."""
    with _safetensors_errors(path), safe_open(path, framework="pt") as f:
        missing = [n for n in names if n not in f.keys()]
        if missing:
            raise WeightFileError(path, f"missing tensors {missing}")
        return {n: f.get_tensor(n) for n in names}


def read_float32(path: Path, name: str) -> torch.Tensor:
    """One tensor of a safetensors file as float32, converted in row blocks of ``FLOAT32_BLOCK_BYTES``: a bf16
    tensor costs its float32 copy, not that plus the whole bf16 one (1 GiB more for Llama-3.1-8B's embedding). The
    file is mapped anew for each block, since the pages of a mapping read so far count in the resident set until
    it is closed. File-naming errors as ``read_safetensors``; a float32 tensor is read as it is."""
    with _safetensors_errors(path):
        with safe_open(path, framework="pt") as f:
            if name not in f.keys():
                raise WeightFileError(path, f"missing tensors {[name]}")
            part = f.get_slice(name)
            shape = part.get_shape()
            if part.get_dtype() == "F32" or not shape:
                return f.get_tensor(name)
        out = torch.empty(shape, dtype=torch.float32)
        rows = max(1, FLOAT32_BLOCK_BYTES // (4 * math.prod(shape[1:])))
        for start in range(0, shape[0], rows):
            with safe_open(path, framework="pt") as f:
                out[start : start + rows] = f.get_slice(name)[start : start + rows]
        return out


@contextlib.contextmanager
def _safetensors_errors(path: Path) -> Iterator[None]:
    """Errors of reading the safetensors file ``path`` as ``WeightFileError`` naming it."""
    try:
        yield
    except WeightFileError:
        raise
    except FileNotFoundError as exc:
        raise WeightFileError(path, "file not found") from exc
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WeightFileError(path, f"unreadable safetensors ({exc})") from exc


FORMATS: dict[str, SaeFormat] = {
    "gemma_scope_npz": GemmaScopeNpz(),
    "gemma_scope_2_safetensors": GemmaScope2Safetensors(),
    "llama_scope_safetensors": LlamaScopeSafetensors(),
}
