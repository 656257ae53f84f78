"""Resources: where weights come from (hub), where results go (store), how to compute (device)."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import torch

from core.registry import load_registry
from core.stages import EngineSettings
from core.store.storage import TableStore
from core.weights.hub import Hub

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PLANTED_CACHE_ENV = "WEIGHTLENS_PLANTED_CACHE"


def default_data_dir() -> str:
    """``$WEIGHTLENS_DATA_DIR`` or ``<project>/data``."""
    return os.environ.get("WEIGHTLENS_DATA_DIR", str(PROJECT_ROOT / "data"))


class HubResource(dg.ConfigurableResource):
    """Hugging Face hub access. ``cache_dir`` None = huggingface_hub's default cache (HF_HUB_CACHE /
    HF_HOME), so weights a user already has are not downloaded again; ``offline`` None = follow
    HF_HUB_OFFLINE; ``planted_cache_dir`` None = ``$WEIGHTLENS_PLANTED_CACHE`` (``scripts/env.sh``:
    ``<data dir>/planted-hub``, where ``scripts/demo.sh`` generates them): the cache the planted releases are
    read from when the hub cache lacks them (``core.weights.hub``); unset too, the hub cache only. The token is never
    part of this config: it is read by huggingface_hub from HF_TOKEN or ``hf auth login``."""

    cache_dir: str | None = None
    offline: bool | None = None
    planted_cache_dir: str | None = None

    def client(self) -> Hub:
        planted = self.planted_cache_dir or os.environ.get(PLANTED_CACHE_ENV)
        return Hub(
            cache_dir=Path(self.cache_dir) if self.cache_dir else None,
            offline=self.offline,
            planted_cache_dir=Path(planted) if planted else None,
            planted_repos=planted_repos(),
        )


def planted_repos() -> frozenset[str]:
    """The model and SAE repositories of the registry's generated releases (``planted`` / ``trained`` in
    releases.yaml), read from the generated releases' cache."""
    return frozenset(repo for r in load_registry().values() if r.generated for repo in (r.sae_repo, r.model_repo))


class StoreResource(dg.ConfigurableResource):
    """The data directory: Parquet tables + ``results.duckdb`` views, plots and reports."""

    data_dir: str = default_data_dir()

    def tables(self) -> TableStore:
        return TableStore(self.data_dir)

    def artifacts(self, kind: str) -> Path:
        """A sub-directory for files users open directly (``plots``, ``reports``)."""
        path = Path(self.data_dir).resolve() / kind
        path.mkdir(parents=True, exist_ok=True)
        return path


class ComputeResource(dg.ConfigurableResource):
    """Interaction-engine settings. ``device`` None = CUDA when available, else CPU; ``dtype`` is the
    matmul precision (statistics are always accumulated in float32). ``null_directions`` random unit
    directions calibrate the lenses, ``circuit_null_directions`` the attention circuits.
    ``circuit_layers`` (``core.lens.circuits.paired_layers``): "adjacent" = the writer layer L and the reader layer
    L+1 of a resid_post(L) SAE (every head); "all" = writers 0..L and readers L+1..N−1 (the full grid, a GPU
    job at real scale). ``circuit_set`` (``core.lens.circuits.CIRCUIT_SETS``): "used" = the circuit kinds the classes
    and claims read; "all" adds the decoder-side ``ov`` logit circuits to ``circuit_stats``."""

    device: str | None = None
    dtype: str = "float32"
    top_k: int = 10
    null_directions: int = 1024
    circuit_null_directions: int = 256
    circuit_layers: str = "adjacent"
    circuit_set: str = "used"

    def engine(self) -> EngineSettings:
        """The engine settings of every stage (``core.stages``)."""
        return EngineSettings(k=self.top_k, compute_dtype=self.torch_dtype(), device=self.resolved_device())

    def torch_dtype(self) -> torch.dtype:
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
        if self.dtype not in dtypes:
            raise ValueError(f"compute dtype {self.dtype!r} is not one of {sorted(dtypes)}")
        return dtypes[self.dtype]

    def resolved_device(self) -> str:
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")
