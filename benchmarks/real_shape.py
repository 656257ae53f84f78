"""The asset chain on one SAE of a random-weight model with a real model's exact shapes: seconds, the engine's
matmul floor and peak memory per asset.

Run: .venv/bin/python benchmarks/real_shape.py --dir DIR [--model gemma-2-2b|llama-3.1-8b]
     [--dtype float32|bfloat16] [--circuit-layers adjacent|all] [--circuits N] [--keep]

Writes, in the exact hub layout of a Hugging Face cache under ``DIR/hub``, a model with the named real model's
config and one SAE of its release (``MODELS``):

* ``gemma-2-2b``: google/gemma-2-2b (vocabulary 256000, d 2304, 26 layers, 8 query / 4 key-value heads of 256,
  float32 on the hub, tied embedding) and one Gemma Scope SAE (layer 12, width 16k, the canonical L0 82);
* ``llama-3.1-8b``: meta-llama/Llama-3.1-8B (vocabulary 128256, d 4096, 32 layers, 32 query / 8 key-value heads
  of 128, bfloat16 on the hub, separate lm_head) and one Llama Scope SAE (layer 15, 8x: 32768 latents).

The model is laid out as the real repo is (safetensors shards + index) with the embedding, norms and attention
weights first and the MLP weights in shards of their own. The MLP shards are listed in the index but not
written: the chain never reads them, and a cache the chain filled online holds only the shards with tensors it
needs (``ModelCheckpoint.needed_shards``). Every tensor is drawn at random and streamed to disk shard by shard.
Then it materialises the chain of that partition offline, each asset in its own process (so each peak is its
own), with a persistent Dagster instance under ``DIR``, and prints per
asset:

* seconds: wall time of the asset's run in its process (Dagster's start-up excluded);
* engine s / floor s: time inside ``core.compute.engine.row_stats`` and the FLOPs it did (2 n_a n_b r per call) at
  the throughput of this machine's best blocked matmul for the lens shape (``engine_benchmark``'s grid);
* floor / s: the share of the asset's time the floor would take — 100 % is an asset that is all matmul;
* peak RSS (the process's own high-water mark, ``benchmarks.memory.peak_rss``) and its excess over a bare process
  that imports the same modules, beside the bytes of the tensors a step needs (embedding + final norm + the norms
  and attention weights of the two layers the SAE pairs with + the SAE);
* where the resident set rose (``benchmarks.memory.HighWater``: each rise of 32 MiB with the code line running),
  in ``DIR/step-<asset>-memory.txt``, its highest record printed under the table.

``--circuit-layers all`` runs the full layer grid (``ComputeResource.circuit_layers``); ``--circuits N`` keeps the
first N/2 circuits of each phase of the scope (a slice, for the memory curve of a grid that takes hours: the step's
resident set after each circuit is printed with its slope per circuit, to extrapolate from).

Not in CI: Gemma-2-2B needs ~3 GB of disk (twice that while the cache copies the shards) and ~50 minutes per
dtype on 2 cores; Llama-3.1-8B ~2.5 GB and longer (96 circuits). ``--keep`` keeps ``DIR`` (model and results)
for another run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.memory import HighWater, current_rss, peak_rss  # noqa: E402

GEMMA_2_2B = dict(  # google/gemma-2-2b config.json
    architectures=["Gemma2ForCausalLM"],
    model_type="gemma2",
    vocab_size=256000,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    hidden_act="gelu_pytorch_tanh",
    hidden_activation="gelu_pytorch_tanh",
    max_position_embeddings=8192,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    attention_bias=False,
    attention_dropout=0.0,
    final_logit_softcapping=30.0,
    attn_logit_softcapping=50.0,
    query_pre_attn_scalar=256,
    sliding_window=4096,
    tie_word_embeddings=True,
    bos_token_id=2,
    eos_token_id=1,
    pad_token_id=0,
    torch_dtype="float32",
)
LLAMA_3_1_8B = dict(  # meta-llama/Llama-3.1-8B config.json
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    hidden_act="silu",
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling={
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    attention_bias=False,
    attention_dropout=0.0,
    mlp_bias=False,
    tie_word_embeddings=False,
    bos_token_id=128000,
    eos_token_id=128001,
    torch_dtype="bfloat16",
)


@dataclass(frozen=True)
class RealModel:
    """A real model's config and the release, layer and width of the SAE the benchmark pairs with it."""

    config: dict[str, Any]
    model_repo: str
    release: str
    sae_repo: str
    layer: int
    d_sae: int
    sae_id: str

    @property
    def file_dtype(self) -> torch.dtype:
        return getattr(torch, self.config["torch_dtype"])


MODELS = {
    "gemma-2-2b": RealModel(
        GEMMA_2_2B,
        "google/gemma-2-2b",
        "gemma-scope-2b-pt-res",
        "google/gemma-scope-2b-pt-res",
        12,
        16384,
        "layer_12/width_16k/average_l0_82",
    ),
    "llama-3.1-8b": RealModel(
        LLAMA_3_1_8B,
        "meta-llama/Llama-3.1-8B",
        "llama_scope_lxr_8x",
        "fnlp/Llama3_1-8B-Base-LXR-8x",
        15,
        32768,
        "l15r_8x",
    ),
}
SHARD_BYTES = 2 << 30
READ_BY_CHAIN = ("embed_tokens", "lm_head", "norm", "self_attn", "layernorm")  # MLP weights are never read


def _tensor(name: str, shape: tuple[int, ...], g: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """A random tensor: RMSNorm gains near Gemma's 1 + w = 1, matrices with unit-variance rows' outputs."""
    if len(shape) == 1:
        return (torch.randn(shape, generator=g) * 0.05).to(dtype)
    return (torch.randn(shape, generator=g) / shape[-1] ** 0.5).to(dtype)


def write_model(model: RealModel, staging: Path, seed: int = 0) -> dict[str, Path]:
    """The model repo's files in ``staging``: config, a tokenizer of the vocabulary's size, the shards holding
    tensors the chain reads, and the index of every shard (the MLP shards listed, not written: module doc)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {k: v for k, v in model.config.items() if k not in ("architectures", "model_type", "torch_dtype")}
    config = AutoConfig.for_model(model.config["model_type"], **settings)
    with torch.device("meta"):
        state = AutoModelForCausalLM.from_config(config).state_dict()
    tied = model.config["tie_word_embeddings"]
    shapes = {name: tuple(t.shape) for name, t in state.items() if not (tied and name == "lm_head.weight")}
    width = model.file_dtype.itemsize
    read = [name for name in shapes if any(part in name for part in READ_BY_CHAIN)]
    unread = [name for name in shapes if name not in read]
    shards: list[tuple[bool, list[str]]] = []
    for written, names in ((True, read), (False, unread)):
        size = 0
        shards.append((written, []))
        for name in names:
            nbytes = width * int(np.prod(shapes[name]))
            if shards[-1][1] and size + nbytes > SHARD_BYTES:
                shards.append((written, []))
                size = 0
            shards[-1][1].append(name)
            size += nbytes
    g = torch.Generator().manual_seed(seed)
    files: dict[str, Path] = {}
    weight_map = {}
    for i, (written, names) in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        weight_map |= {name: file for name in names}
        if written:
            tensors = {name: _tensor(name, shapes[name], g, model.file_dtype) for name in names}
            save_file(tensors, str(staging / file), metadata={"format": "pt"})
            files[file] = staging / file
            print(f"  wrote {file} ({len(names)} tensors)", flush=True)
    total = sum(width * int(np.prod(s)) for s in shapes.values())
    (staging / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    (staging / "config.json").write_text(json.dumps(model.config, indent=2))
    tokenizer = staging / "tokenizer.json"
    _tokenizer(model.config["vocab_size"]).save(str(tokenizer))
    return files | {name: staging / name for name in ("model.safetensors.index.json", "config.json", "tokenizer.json")}


def _tokenizer(vocab_size: int):  # noqa: ANN202 - tokenizers.Tokenizer
    """A byte-level BPE tokenizer with exactly ``vocab_size`` ids: GPT-2's 50257 tokens, then words made of
    two of them (real-looking strings; Gemma's own vocabulary is not on this machine)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from core.testbeds.planted import _gpt2_files

    vocab, merges = _gpt2_files()
    pieces = sorted(vocab, key=vocab.get)
    rng = np.random.default_rng(0)
    while len(vocab) < vocab_size:
        a, b = rng.integers(256, len(pieces), 2)
        word = pieces[a] + pieces[b].lstrip("Ġ")
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def write_sae(model: RealModel, staging: Path, seed: int = 1) -> dict[str, Path]:
    """The SAE's files in its release's format, random unit decoder rows (the encoder their transpose): a Gemma
    Scope ``params.npz`` (JumpReLU W_enc (d, d_sae), W_dec (d_sae, d), biases, thresholds) or a Llama Scope folder
    (``core.testbeds.planted.llama_scope_files``: bf16 safetensors and ``hyperparams.json``)."""
    from core.registry import get_release
    from core.testbeds.planted import llama_scope_files

    rng = np.random.default_rng(seed)
    d = model.config["hidden_size"]
    w_dec = rng.standard_normal((model.d_sae, d), dtype=np.float32)
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    arrays = dict(
        W_enc=np.ascontiguousarray(w_dec.T),
        W_dec=w_dec,
        b_enc=np.zeros(model.d_sae, np.float32),
        b_dec=np.zeros(d, np.float32),
        threshold=rng.uniform(0.05, 0.5, model.d_sae).astype(np.float32),
    )
    folder = get_release(model.release).sae(model.sae_id).folder
    if model.config["model_type"] == "gemma2":
        path = staging / "params.npz"
        np.savez(path, **arrays)
        return {f"{folder}/params.npz": path}
    tensors = {name: torch.from_numpy(a) for name, a in arrays.items() if name != "threshold"}
    files = llama_scope_files(
        tensors, layer=model.layer, jump_relu_threshold=0.5, average_norm=d**0.5, include_decoder_norm=False
    )
    out = {}
    for name, data in files.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_bytes(data)
        out[f"{folder}/{name}"] = staging / name
    return out


def read_bytes(model: RealModel) -> int:
    """Bytes of the float32 tensors a step of the SAE needs: the embedding (and a separate unembedding), the
    final norm, the norms and attention weights of the two layers it pairs with (``circuit_layers`` "adjacent")
    and the SAE."""
    c = model.config
    d, heads, kv, hd = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    per_layer = 2 * d * heads * hd + 2 * d * kv * hd + 4 * d
    vocab = c["vocab_size"] * d * (1 if c["tie_word_embeddings"] else 2)
    return 4 * (vocab + d + 2 * per_layer + 2 * model.d_sae * d + 2 * model.d_sae + d)


# -- one asset per process ---------------------------------------------------------------------------------------


def step(args: argparse.Namespace) -> None:
    """Materialise one asset of the partition (``--asset``) with the engine counted; write its figures."""
    from core.compute import engine

    calls: list[dict[str, float]] = []
    inner = engine.row_stats

    def counted(left: torch.Tensor, right: torch.Tensor, **kwargs: object) -> engine.RowStats:
        start = time.perf_counter()
        result = inner(left, right, **kwargs)  # type: ignore[arg-type]
        calls.append(
            {
                "flop": 2.0 * left.shape[0] * right.shape[0] * left.shape[1],
                "seconds": time.perf_counter() - start,
                "rss": current_rss(),
            }
        )
        return result

    engine.row_stats = counted  # before the stages import it by name
    if args.circuits:
        _slice_circuits(args.circuits)
    import dagster as dg

    from orchestration.cli import run_assets
    from orchestration.resources import ComputeResource, HubResource, StoreResource

    resources = {
        "hub": HubResource(cache_dir=str(args.dir / "hub"), offline=True),
        "store": StoreResource(data_dir=str(args.dir / "data")),
        "compute": ComputeResource(dtype=args.dtype, circuit_layers=args.circuit_layers),
    }
    instance = dg.DagsterInstance.get()  # DAGSTER_HOME: one instance for the whole chain
    model = MODELS[args.model]
    partition = f"{model.release}:{model.sae_id}"
    if not instance.has_dynamic_partition("sae", partition):
        instance.add_dynamic_partitions("sae", [partition])
    start = time.perf_counter()
    with HighWater(interval=0.02) as trace:
        run_assets(instance, [dg.AssetKey.from_user_string(args.asset)], partition, resources)
    seconds = time.perf_counter() - start
    (args.dir / f"step-{args.asset}-memory.txt").write_text(trace.report() + "\n")
    figures = {
        "seconds": seconds,
        "engine_seconds": sum(c["seconds"] for c in calls),
        "flop": sum(c["flop"] for c in calls),
        "peak": peak_rss(),
        "rss_after_calls": [c["rss"] for c in calls],
    }
    (args.dir / f"step-{args.asset}.json").write_text(json.dumps(figures))


def _slice_circuits(n: int) -> None:
    """Make the circuit stage run only the first ``n // 2`` circuits of each phase of its scope (``--circuits``)."""
    from core import stages
    from core.lens.circuits import PHASES

    every = stages.all_circuits

    def sliced(*args: Any, **kwargs: Any) -> list:
        found = every(*args, **kwargs)
        return [c for phase in PHASES for c in [c for c in found if c.phase == phase][: n // 2]]

    stages.all_circuits = sliced


def circuit_curve(rss_after_calls: list[int]) -> str:
    """The circuit step's resident set after each circuit (every ``len(SAMPLES)`` engine calls: one per sample),
    first / middle / last, and its least-squares slope per circuit over the second half (MiB)."""
    from core.stages import SAMPLES

    after = np.array(rss_after_calls[len(SAMPLES) - 1 :: len(SAMPLES)], dtype=np.float64) / (1 << 30)
    if len(after) < 4:
        return f"{len(after)} circuits: too few for a curve"
    half = after[len(after) // 2 :]
    slope = round(float(np.polyfit(np.arange(len(half)), half, 1)[0]) * 1024, 1) + 0.0  # no "-0.0"
    return (
        f"{len(after)} circuits, resident set after circuit 1 / {len(after) // 2} / {len(after)}: "
        f"{after[0]:.2f} / {after[len(after) // 2 - 1]:.2f} / {after[-1]:.2f} GiB, slope over the second half "
        f"{slope:+.1f} MiB per circuit"
    )


def _child(argv: list[str], env: dict[str, str]) -> None:
    if subprocess.run(argv, env=env).returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed")


def floor_flops(model: RealModel, dtype: torch.dtype) -> tuple[float, str]:
    """FLOP/s of this machine's best blocked matmul for the lens shape (1024 rows x the vocabulary)."""
    from benchmarks.engine_benchmark import best_block, blocked_matmul, timed

    g = torch.Generator().manual_seed(0)
    c = model.config
    left = torch.randn(1024, c["hidden_size"], generator=g)
    right = torch.randn(c["vocab_size"], c["hidden_size"], generator=g).to(dtype)
    rows, cols = best_block(left, right, dtype)
    seconds = timed(lambda: blocked_matmul(left, right, dtype, rows, cols), right.device, 2)
    return 2.0 * left.numel() * len(right) / seconds, f"{rows} x {cols or len(right)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--model", default="gemma-2-2b", choices=sorted(MODELS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--circuit-layers", default="adjacent", choices=["adjacent", "all"])
    parser.add_argument("--circuits", type=int, default=0, help="the first N/2 circuits of each phase (0: all)")
    parser.add_argument("--asset", help=argparse.SUPPRESS)  # internal: one asset in this process
    args = parser.parse_args()
    args.dir = args.dir.resolve()
    model = MODELS[args.model]
    if args.asset:
        step(args)
        return

    from core.weights.hub_cache import write_snapshot
    from orchestration.cli import chain_of

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DAGSTER_HOME": str(args.dir / "dagster")}
    (args.dir / "dagster").mkdir(parents=True, exist_ok=True)
    hub = args.dir / "hub"
    if not hub.exists():
        staging = args.dir / "staging"
        staging.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        write_snapshot(hub, model.model_repo, write_model(model, staging), base=None)
        write_snapshot(hub, model.sae_repo, write_sae(model, staging), base=None)
        shutil.rmtree(staging)
        print(f"model and SAE written in {time.perf_counter() - start:.0f} s", flush=True)
    for old in (args.dir / "data", args.dir / "dagster"):
        shutil.rmtree(old, ignore_errors=True)
    (args.dir / "dagster").mkdir()

    flops, block = floor_flops(model, getattr(torch, args.dtype))
    me = [sys.executable, str(Path(__file__).resolve()), "--dir", str(args.dir), "--model", args.model]
    me += ["--dtype", args.dtype, "--circuit-layers", args.circuit_layers, "--circuits", str(args.circuits)]
    root = Path(__file__).resolve().parents[1]
    bare_code = "import torch, dagster, orchestration.definitions, benchmarks.memory as m; print(m.peak_rss())"
    bare = int(subprocess.check_output([sys.executable, "-c", bare_code], env={**env, "PYTHONPATH": str(root)}))
    rows = []
    for asset in chain_of(model.release):
        name = asset.to_user_string()
        _child([*me, "--asset", name], env)
        figures = json.loads((args.dir / f"step-{name}.json").read_text())
        rows.append((name, figures, figures["peak"]))

    gib = 1 << 30
    print(
        f"\n{model.release}:{model.sae_id} on {model.model_repo}'s shapes, {args.dtype}, {torch.get_num_threads()} "
        f"threads; floor: best blocked matmul {flops / 1e9:.1f} GFLOP/s ({block}); tensors a step needs "
        f"{read_bytes(model) / gib:.2f} GiB; a bare process {bare / gib:.2f} GiB"
    )
    print(
        f"{'asset':<22} {'seconds':>8} {'engine s':>9} {'floor s':>8} {'floor/s':>8} {'peak GiB':>9} {'over bare':>9}"
    )
    for name, f, peak in rows:
        floor = f["flop"] / flops
        print(
            f"{name:<22} {f['seconds']:8.1f} {f['engine_seconds']:9.1f} {floor:8.1f} "
            f"{floor / f['seconds']:8.1%} {peak / gib:9.2f} {(peak - bare) / gib:9.2f}"
        )
    total = sum(f["seconds"] for _, f, _ in rows)
    print(
        f"{'total':<22} {total:8.1f} {sum(f['engine_seconds'] for _, f, _ in rows):9.1f} "
        f"{sum(f['flop'] for _, f, _ in rows) / flops:8.1f}"
    )
    for name, _, _ in rows:
        trace = (args.dir / f"step-{name}-memory.txt").read_text().splitlines()
        print(f"{name}: highest rise {next((line for line in trace if line.startswith('*')), 'none')}")
    circuits = next(f for name, f, _ in rows if name == "circuit_tables")
    print(f"circuit_tables: {circuit_curve(circuits['rss_after_calls'])}")
    if not args.keep:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
