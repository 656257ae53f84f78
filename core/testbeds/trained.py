"""Generator of the trained releases: tiny Llama / Gemma-2 models and SAEs that *learned* their structure from real
text.

``generate(release_id, cache_dir)`` reads the registry entry (``core/releases.yaml``, block ``trained:``) and writes
a model repo and an SAE repo into a Hugging Face hub cache (``core.weights.hub_cache``), in the same layouts as the
planted releases (``core.testbeds.planted``), but nothing in the weights is planted:

* Corpus: CPython's ``pydoc_data.topics`` (the Python Language Reference sections ``pydoc`` shows; ~465k characters
  of English prose with code, present in every CPython install; the interpreter version is recorded). Topics are
  sorted by name; every ``heldout_every``-th topic is held out (a split by document, so no passage is in both).
* Tokenizer: a byte-level BPE of ``vocab_size`` tokens (``<|endoftext|>`` first) trained on the training split with
  the ``tokenizers`` library, saved as ``tokenizer.json`` through transformers' ``PreTrainedTokenizerFast``.
* Model: transformers' ``LlamaForCausalLM`` (untied, saved bfloat16 as Llama 3.1 is) or ``Gemma2ForCausalLM``
  (tied, softcaps 50 / 30, float32), trained with AdamW on random ``context``-token windows of the training split.
  The held-out cross-entropy (nats / token) is reported beside the unigram baseline (the held-out cross-entropy of
  the training split's add-one unigram distribution).
* SAEs, one per layer, on resid_post (transformers' ``model.layers[L]`` output) of the *saved* model (bf16-rounded
  for Llama): ReLU SAEs trained with an L1 penalty on ``f_i · ||W_dec[i]||`` (Anthropic, "Towards
  Monosemanticity" / April 2024 update), written as JumpReLU SAEs with a small threshold — Gemma Scope
  ``params.npz`` (decoder rows unit-norm; the norm moved into the encoder, which leaves every activation unchanged)
  or Llama Scope ``checkpoints/final.safetensors`` + ``hyperparams.json`` (trained on ``s · x``,
  ``s = sqrt(d_model) / dataset_average_activation_norm``; the scalar ``jump_relu_threshold`` is written as
  ``theta / s`` so that SAELens' reading, ``threshold = jump_relu_threshold · s``, and ``core.weights.sae_formats``'
  give the trained threshold). Their quality — fraction of variance explained, L0 and dead features on the held-out
  split — is measured on the files as ``core.weights.sae_formats`` reads them back.
* ``trained_metrics.json`` at the SAE repo root: corpus (source, Python version, sha256, characters, tokens per
  split), losses, per-SAE metrics, seconds per stage; ``corpus/heldout.txt`` beside it (the registry's ``corpus``
  field names it: the held-out text that activation measurements read).

Fixed seeds and ``torch.use_deterministic_algorithms``: the same parameters on the same machine (thread count
included) give the same files and commits (``tests/test_trained.py``).
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.registry import generator_entries
from core.testbeds.planted import config_fields, generator_args, llama_scope_files, npz_bytes, saved_files
from core.weights.hub_cache import write_snapshot
from core.weights.sae_formats import FORMATS

__all__ = ["TrainedParams", "TrainedRelease", "corpus_split", "generate", "main"]

METRICS_FILE = "trained_metrics.json"
EOT = "<|endoftext|>"


@dataclass(frozen=True)
class TrainedParams:
    """Every knob of one trained release (the registry's ``trained:`` block overrides the defaults)."""

    architecture: str  # llama | gemma2
    seed: int
    n_layers: int
    vocab_size: int = 2048
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 384
    heldout_every: int = 8  # every 8th topic (sorted by name) is held out
    context: int = 64
    batch: int = 16
    steps: int = 300
    lr: float = 3e-3
    d_sae: int = 1024
    sae_positions: int = 32768  # training positions per SAE (windows of ``context`` tokens)
    sae_steps: int = 400
    sae_batch: int = 512
    sae_lr: float = 2e-3
    sae_l1: float = 4.0  # on f_i * ||d_i||, activations in units where E||x|| = sqrt(d_model) (Anthropic: 5)
    sae_threshold: float = 0.05  # JumpReLU threshold written (same units)


@dataclass(frozen=True)
class TrainedRelease:
    release_id: str
    model_repo: str
    model_commit: str
    sae_repo: str
    sae_commit: str
    metrics: dict[str, Any]


def _entry(release_id: str) -> dict[str, Any]:
    trained = generator_entries("trained")
    if release_id not in trained:
        raise KeyError(f"{release_id!r} is not a trained release; trained ones: {trained_ids()}")
    return trained[release_id]


def trained_ids() -> list[str]:
    """The registry's trained release ids (a ``trained:`` block)."""
    return list(generator_entries("trained"))


def corpus_split(heldout_every: int) -> tuple[list[str], list[str], dict[str, Any]]:
    """(train documents, held-out documents, provenance) from ``pydoc_data.topics``."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    docs = [topics[n].strip() for n in names]
    heldout = [d for i, d in enumerate(docs) if i % heldout_every == heldout_every - 1]
    train = [d for i, d in enumerate(docs) if i % heldout_every != heldout_every - 1]
    text = "\n\n".join(docs).encode()
    source = {
        "source": "CPython pydoc_data.topics (Python Language Reference topics)",
        "python": platform.python_version(),
        "sha256": hashlib.sha256(text).hexdigest(),
        "documents": len(docs),
        "characters": len(text),
        "heldout_every": heldout_every,
    }
    return train, heldout, source


def _tokenizer(train: list[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(train, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT)


def _stream(tokenizer: Any, docs: list[str]) -> torch.Tensor:
    """Every document's tokens, each followed by ``<|endoftext|>``, as one 1-d stream."""
    eot = tokenizer.convert_tokens_to_ids(EOT)
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + [eot]
    return torch.tensor(ids, dtype=torch.long)


def _model(p: TrainedParams, vocab_size: int, eot: int) -> Any:
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    common = config_fields(p, vocab_size, eot) | dict(pad_token_id=eot, max_position_embeddings=max(2048, p.context))
    if p.architecture == "gemma2":
        return Gemma2ForCausalLM(
            Gemma2Config(
                **common,
                query_pre_attn_scalar=p.head_dim,
                attn_logit_softcapping=50.0,
                final_logit_softcapping=30.0,
                tie_word_embeddings=True,
                sliding_window=p.context,
                attn_implementation="eager",  # type: ignore[call-arg]  # a PretrainedConfig keyword
            )
        )
    if p.architecture == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False, rms_norm_eps=1e-5))
    raise ValueError(f"unknown trained architecture {p.architecture!r} (llama, gemma2)")


def _windows(stream: torch.Tensor, context: int, gen: torch.Generator, n: int) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - context, (n,), generator=gen)
    return torch.stack([stream[s : s + context] for s in starts.tolist()])


def _chunks(stream: torch.Tensor, context: int) -> torch.Tensor:
    n = len(stream) // context
    return stream[: n * context].view(n, context)


def _train_model(model: Any, p: TrainedParams, train: torch.Tensor, gen: torch.Generator) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, p.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, p.steps) / p.steps))
    )
    model.train()
    losses = []
    for _ in range(p.steps):
        batch = _windows(train, p.context, gen, p.batch)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@torch.no_grad()
def heldout_loss(model: Any, heldout: torch.Tensor, context: int) -> float:
    """Mean next-token cross-entropy (nats / token) over the held-out stream cut into ``context`` windows."""
    chunks = _chunks(heldout, context)
    total, count = 0.0, 0
    for batch in chunks.split(64):
        logits = model(input_ids=batch).logits[:, :-1].float()
        total += float(
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
        )
        count += batch[:, 1:].numel()
    return total / count


def unigram_loss(train: torch.Tensor, heldout: torch.Tensor, vocab_size: int) -> float:
    """Held-out cross-entropy (nats / token) of the training split's add-one unigram distribution."""
    counts = torch.bincount(train, minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[heldout[1:]].mean())


@torch.no_grad()
def resid_post(model: Any, chunks: torch.Tensor, layer: int) -> torch.Tensor:
    """resid_post of block ``layer`` (transformers' ``model.layers[layer]`` output), (positions, d_model) float32."""
    out: list[torch.Tensor] = []
    block = model.model.layers[layer]
    handle = block.register_forward_hook(lambda _m, _i, o: out.append((o[0] if isinstance(o, tuple) else o).float()))
    try:
        for batch in chunks.split(64):
            model(input_ids=batch)
    finally:
        handle.remove()
    return torch.cat(out).reshape(-1, model.config.hidden_size)


def _train_sae(x: torch.Tensor, p: TrainedParams, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A ReLU SAE on ``x`` (positions, d): ``f = relu(x W_enc + b_enc)``, ``x_hat = f W_dec + b_dec``, loss
    ``||x - x_hat||^2 + l1 Σ f_i ||W_dec[i]||``; decoder initialised as the encoder's transpose."""
    d = x.shape[1]
    w_dec = torch.randn(p.d_sae, d, generator=gen)
    w_dec = 0.1 * w_dec / w_dec.norm(dim=1, keepdim=True)
    params = {
        "W_enc": w_dec.T.clone().requires_grad_(),
        "b_enc": torch.zeros(p.d_sae, requires_grad=True),
        "W_dec": w_dec.requires_grad_(),
        "b_dec": x.mean(0).clone().requires_grad_(),
    }
    opt = torch.optim.Adam(params.values(), lr=p.sae_lr)
    for step in range(p.sae_steps):
        batch = x[torch.randint(0, len(x), (p.sae_batch,), generator=gen)]
        f = torch.relu(batch @ params["W_enc"] + params["b_enc"])
        recon = f @ params["W_dec"] + params["b_dec"]
        l1 = min(1.0, (step + 1) / max(1, p.sae_steps // 10)) * p.sae_l1  # L1 warm-up
        loss = (recon - batch).pow(2).sum(1).mean() + l1 * (f * params["W_dec"].norm(dim=1)).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {k: v.detach() for k, v in params.items()}


def _sae_files(
    p: TrainedParams, fmt: str, layer: int, sae: dict[str, torch.Tensor], scale: float, avg_norm: float
) -> dict[str, bytes]:
    """One SAE trained on ``scale · x`` as the files of its folder (paths relative to it) in format ``fmt``, so
    that ``core.weights.sae_formats`` (and SAELens) read it back in model units with threshold ``sae_threshold`` on the
    trained pre-activation."""
    theta = p.sae_threshold
    if fmt == "gemma_scope_npz":  # model units: pre = x (s W_enc) + b_enc; x_hat = f (W_dec / s) + b_dec / s
        w_dec = sae["W_dec"] / scale
        norm = w_dec.norm(dim=1).clamp_min(1e-12)  # unit decoder rows, f_i -> f_i ||d_i||: same reconstruction
        arrays = {
            "W_enc": sae["W_enc"] * scale * norm,
            "W_dec": w_dec / norm[:, None],
            "b_enc": sae["b_enc"] * norm,
            "b_dec": sae["b_dec"] / scale,
            "threshold": theta * norm,
        }
        return {"params.npz": npz_bytes({k: v.numpy().astype(np.float32) for k, v in arrays.items()})}
    if fmt != "llama_scope_safetensors":
        raise ValueError(f"no trained writer for format {fmt!r}")
    return llama_scope_files(
        sae,
        layer=layer,
        jump_relu_threshold=theta / scale,
        average_norm=avg_norm,
        include_decoder_norm=False,
    )


def sae_quality(x: torch.Tensor, folder: Path, fmt: str) -> dict[str, float]:
    """Fraction of variance explained, mean L0 and dead fraction of the SAE in ``folder`` as
    ``core.weights.sae_formats`` reads it (model units, JumpReLU ``f = pre · [pre > threshold]``), on the positions
    ``x``."""
    sae = FORMATS[fmt].read(folder, x.shape[1])
    pre = x @ sae.W_enc + sae.b_enc
    f = pre * (pre > sae.threshold)
    recon = f @ sae.W_dec + sae.b_dec
    fve = 1.0 - float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    fired = f > 0
    return {
        "variance_explained": round(fve, 4),
        "l0": round(float(fired.sum(1).float().mean()), 2),
        "dead_fraction": round(float((~fired.any(0)).float().mean()), 4),
    }


def generate(release_id: str, cache_dir: Path, *, overrides: dict[str, Any] | None = None) -> TrainedRelease:
    """Train and write the release ``release_id`` (model + SAE repo) into the hub cache ``cache_dir``."""
    entry = _entry(release_id)
    p = TrainedParams(n_layers=entry["n_layers"], **{**entry["trained"], **(overrides or {})})
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _generate(release_id, entry, p, cache_dir)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _generate(release_id: str, entry: dict[str, Any], p: TrainedParams, cache_dir: Path) -> TrainedRelease:
    torch.manual_seed(p.seed)
    gen = torch.Generator().manual_seed(p.seed)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    train_docs, heldout_docs, corpus = corpus_split(p.heldout_every)
    tokenizer = _tokenizer(train_docs, p.vocab_size)
    train, heldout = _stream(tokenizer, train_docs), _stream(tokenizer, heldout_docs)
    corpus |= {"train_tokens": len(train), "heldout_tokens": len(heldout)}
    seconds["tokenizer"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model = _model(p, len(tokenizer), tokenizer.convert_tokens_to_ids(EOT))
    curve = _train_model(model, p, train, gen)
    dtype = torch.float32 if p.architecture == "gemma2" else torch.bfloat16
    model = model.to(dtype).float()  # what the saved file computes
    losses = {
        "heldout": round(heldout_loss(model, heldout, p.context), 4),
        "unigram_baseline": round(unigram_loss(train, heldout, len(tokenizer)), 4),
        "train_first": round(curve[0], 4),
        "train_last": round(sum(curve[-10:]) / 10, 4),
    }
    seconds["model"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        model.to(dtype).save_pretrained(tmp, max_shard_size=max(1, p.d_model * len(tokenizer) * dtype.itemsize))
        model.float()
        tokenizer.save_pretrained(tmp)
        model_files = saved_files(Path(tmp))
    # base=None: each repo holds exactly what this generation wrote (regenerating with other parameters into the
    # same cache must not keep the last run's SAE folders, whose names carry their L0)
    model_commit = write_snapshot(cache_dir, entry["model_repo"], model_files, base=None)

    t0 = time.perf_counter()
    train_chunks = _windows(train, p.context, gen, p.sae_positions // p.context)
    heldout_chunks = _chunks(heldout, p.context)
    sae_files: dict[str, bytes] = {}
    saes: dict[str, Any] = {}
    for layer in range(p.n_layers):
        x = resid_post(model, train_chunks, layer)
        avg_norm = round(float(x.norm(dim=1).mean()), 4)  # as hyperparams.json records it
        sae = _train_sae(math.sqrt(p.d_model) / avg_norm * x, p, gen)  # on s·x, E||s x|| = sqrt(d), both formats
        files = _sae_files(p, entry["format"], layer, sae, math.sqrt(p.d_model) / avg_norm, avg_norm)
        x_held = resid_post(model, heldout_chunks, layer)
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
                (Path(tmp) / name).write_bytes(data)
            quality = sae_quality(x_held, Path(tmp), entry["format"])
        fields = dict(layer=layer, width=p.d_sae, l0=round(quality["l0"]), sparsity="trained")
        folder, sae_id = entry["folder"].format(**fields), entry["sae_id"].format(**fields)
        files = {f"{folder}/{name}": data for name, data in files.items()}
        sae_files |= files
        saes[sae_id] = {"layer": layer, "folder": folder, **quality}
    seconds["saes"] = time.perf_counter() - t0

    metrics = {
        "release_id": release_id,
        "params": asdict(p),
        "corpus": corpus,
        "loss_nats_per_token": losses,
        "saes": saes,
        "model_repo": entry["model_repo"],
        "model_commit": model_commit,
        "threads": torch.get_num_threads(),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    sae_files["corpus/heldout.txt"] = "\n\n".join(heldout_docs).encode()
    # seconds vary run to run: kept out of the committed file so the same parameters give the same commit
    stored = {k: v for k, v in metrics.items() if k != "seconds"}
    sae_files[METRICS_FILE] = json.dumps(stored, indent=1, sort_keys=True).encode()
    sae_commit = write_snapshot(cache_dir, entry["sae_repo"], sae_files, base=None)
    return TrainedRelease(release_id, entry["model_repo"], model_commit, entry["sae_repo"], sae_commit, metrics)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m core.testbeds.trained [--cache-dir DIR] [release ...]``."""
    releases, cache_dir = generator_args("trained", "core.testbeds.trained", __doc__ or "", argv)
    for release_id in releases:
        t = generate(release_id, cache_dir)
        loss = t.metrics["loss_nats_per_token"]
        print(f"{release_id}: {t.model_repo}@{t.model_commit} {t.sae_repo}@{t.sae_commit} -> {cache_dir}")
        print(
            f"  held-out loss {loss['heldout']:.3f} nats/token vs unigram baseline {loss['unigram_baseline']:.3f}; "
            f"{t.metrics['seconds']}"
        )
        for sae_id, q in t.metrics["saes"].items():
            print(
                f"  {sae_id}: variance explained {q['variance_explained']:.3f}, L0 {q['l0']:.1f}, "
                f"dead {q['dead_fraction']:.1%}"
            )


if __name__ == "__main__":
    main()
