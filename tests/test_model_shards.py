"""``model_weights`` on real hub paths and real memory (fake hub and fresh processes, so system tier).

Shards: ``model_weights`` lists and fingerprints only the shards holding tensors the analysis reads. A tiny
tied Gemma-2 saved as three shards, the last holding only MLP weights (never read, so ``fetch_model`` never
downloads it), served as ``google/gemma-2-2b`` — the model of a real release, so the online path is
taken (planted releases are always read offline). Online: through the fake hub (``tests/fake_hub.py``) in a
child process. Offline: from a hub cache holding exactly what ``fetch_model`` downloads, written by
``core.weights.hub_cache.write_snapshot``.

Memory: reading a tied model's embedding and unembedding, as peak RSS growth in a fresh process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import torch
from dagster._core.definitions.data_version import DATA_VERSION_TAG
from safetensors.torch import save, save_file
from transformers import Gemma2Config, Gemma2ForCausalLM

from assets.weights import model_weights
from core.store import atomic
from core.weights.hub import fingerprint
from core.weights.hub_cache import read_tree, write_snapshot
from core.weights.model_weights import ModelCheckpoint
from orchestration.resources import HubResource
from tests.fake_hub import FakeHub
from tests.test_hub_online import resolve_requests, run_client

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[1]
MODEL_REPO = "google/gemma-2-2b"
KEY = "gemma-scope-2b-pt-res:layer_1/width_16k/average_l0_41"
SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
NEEDED = ["config.json", "model.safetensors.index.json", *SHARDS[:2]]  # what model_weights reads and lists


def shard_of(name: str) -> str:
    """Shard 2: layer 1's attention and norms; shard 3: every MLP weight; shard 1: the rest."""
    if ".mlp." in name:
        return SHARDS[2]
    return SHARDS[1] if name.startswith("model.layers.1.") else SHARDS[0]


def three_shard_files() -> dict[str, bytes]:
    """config.json, the index and the three shards of a tiny tied Gemma-2 with Gemma-2-2B's 26 layers."""
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=26,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
    )
    state = {n: t.detach().clone() for n, t in Gemma2ForCausalLM(config).state_dict().items() if n != "lm_head.weight"}
    weight_map = {name: shard_of(name) for name in sorted(state)}
    files = {shard: save({n: t for n, t in state.items() if weight_map[n] == shard}) for shard in SHARDS}
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
        "weight_map": weight_map,
    }
    return {
        "config.json": config.to_json_string().encode(),
        "model.safetensors.index.json": json.dumps(index).encode(),
        **files,
    }


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    return three_shard_files()


def materialize_model_weights(cache: Path, offline: bool) -> tuple[dict[str, int], str]:
    """Run ``model_weights`` for ``KEY`` on an ephemeral instance: (its ``shards`` metadata, its data version)."""
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("sae", [KEY])
    result = dg.materialize(
        [model_weights],
        partition_key=KEY,
        instance=instance,
        resources={"hub": HubResource(cache_dir=str(cache), offline=offline)},
    )
    event = result.asset_materializations_for_node("model_weights")[0]
    return event.metadata["shards"].value, event.tags[DATA_VERSION_TAG]


def test_needed_shards_leave_out_the_mlp_only_shard(files, tmp_path):
    folder = tmp_path / "model"
    for name, content in files.items():
        atomic.write_bytes(folder / name, content)
    assert ModelCheckpoint(folder).needed_shards() == SHARDS[:2]


def test_model_weights_offline_from_what_fetch_model_downloads(files, tmp_path):
    """HF_HUB_OFFLINE: the cache holds config, index and shards 1–2 only, as fetch_model's download leaves it."""
    cache = tmp_path / "cache"
    write_snapshot(cache, MODEL_REPO, {name: files[name] for name in NEEDED})
    shards, version = materialize_model_weights(cache, offline=True)
    snapshot = next((cache / "models--google--gemma-2-2b" / "snapshots").iterdir())
    assert shards == {name: len(files[name]) for name in NEEDED}
    assert version == fingerprint([snapshot / name for name in NEEDED])


def test_model_weights_online_downloads_and_lists_only_needed_shards(files, tmp_path):
    source, client = tmp_path / "source", tmp_path / "client"
    commit = write_snapshot(source, MODEL_REPO, files)
    with FakeHub(source, gated={MODEL_REPO}, token="hf_test_token") as hub:
        result, _ = run_client(
            hub.url,
            client,
            """
from tests.test_model_shards import materialize_model_weights
shards, version = materialize_model_weights(HUB.cache_dir, offline=False)
result = {"shards": shards, "version": version}
""",
            token="hf_test_token",
        )
    assert result["shards"] == {name: len(files[name]) for name in NEEDED}
    assert not any(SHARDS[2] in path for path in resolve_requests(hub))  # the MLP-only shard is never asked for
    assert sorted(read_tree(client, MODEL_REPO)) == sorted(NEEDED)
    snapshot = client / "models--google--gemma-2-2b" / "snapshots" / commit
    assert result["version"] == fingerprint([snapshot / name for name in NEEDED])


def test_reading_a_tied_embedding_costs_one_float32_copy(tmp_path):
    """Peak RSS growth of ``embedding()`` then ``unembedding()`` of a tied model with a 400 MB float32 embedding,
    in a fresh process: one copy plus the chunked NaN/Inf check's few MiB. Before: a second read of the same
    tensor and ``torch.isfinite`` over each whole tensor (1.75× it) gave 3.75× the tensor."""
    rows, d = 43_400, 2304  # 100M float32 entries
    config = Gemma2Config(
        vocab_size=rows,
        hidden_size=d,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256,
    )
    atomic.write_text(tmp_path / "config.json", config.to_json_string())
    with atomic.atomic_path(tmp_path / "model.safetensors") as path:
        save_file({"model.embed_tokens.weight": torch.ones(rows, d)}, path)
    code = f"""
import resource
from core.weights.model_weights import ModelCheckpoint
ckpt = ModelCheckpoint({str(tmp_path)!r})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
embedding, unembedding = ckpt.embedding(), ckpt.unembedding()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    growth, size = int(proc.stdout.split()[-1]), rows * d * 4
    assert growth < 1.25 * size, f"reading grew RSS by {growth / size:.2f}× the {size / 2**20:.0f} MiB tensor"
