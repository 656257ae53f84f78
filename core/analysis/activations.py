"""What SAE features do when the model runs on text: where they fire, on which tokens, and what removing them does.

The activation-side counterpart of the weight-only lenses, on a release's held-out corpus (``Release.corpus``).
Feature activations follow ``core.weights.sae_formats`` (model units): ``f = pre · [pre > threshold]``,
``pre = x · W_enc + b_enc``, x = resid_post of block ``layer`` (transformers' ``model.layers[layer]`` output).

* ``firing``: one streamed pass over ``chunks`` (token windows). Per feature: ``firing_rate`` (fraction of
  positions with f > 0), ``mean_activation`` (over firing positions), and its ``contexts`` — the ``n_contexts``
  positions with the largest activation. Input side, ``fires_on``: per feature and token, the mean activation at
  the positions holding that token, over every occurrence (``activation sum / occurrences``, tokens seen at least
  ``min_count`` times) — frequency-normalised, so what the feature reads rather than what the text repeats; the
  top ``k`` per feature.
* ``ablation``: the output effect (the issue's "contribution removed from the SAE reconstruction"): at each of a
  feature's contexts (chunk c, position t, activation a), resid_post(t) becomes ``x_t - a · W_dec[f]`` (every other
  position and the SAE error unchanged), and the next-token log-probabilities at t are compared with the clean
  run: ``delta_f = mean over contexts of (log p_clean - log p_ablated)`` (nats; > 0: the feature promotes the
  token). ``promotes``: the top ``k`` tokens of ``delta_f``; ``effect_size``: ``max_v delta_f[v]``; and
  ``output_score`` in the sense of Arad, Mueller & Belinkov (2025, "SAEs Are Good for Steering – If You Select the
  Right Features", whose output score asks whether an intervention on the feature moves the probability of the
  tokens its logit lens names): the next-token probability on the feature's output-lens top-k tokens that the
  feature supplies, ``sum_{v in lens top-k} mean(p_clean(v) - p_ablated(v))``. Here the intervention is removal at
  the positions where the feature fires, not amplification on a neutral prompt.

* ``attention_received``: the attention counterpart of the decoder phase (the decoder direction written at
  ``layer`` is read as a key by the attention of block ``layer + 1``): per feature, the attention block
  ``layer + 1`` pays to the positions where the feature fires, against what uniform causal attention would pay
  them, ``attention_log_ratio = ln(mean over heads of received / uniform)`` (key position 0 left out: the
  attention sink would dominate). It needs the attention probabilities (a model loaded with
  ``attn_implementation="eager"``); NaN for a feature that never fires past position 0 and for the last layer's
  SAE (no block reads it).

Memory is bounded by one batch of activations, the contexts (``d_sae × n_contexts``), the distinct (feature,
token) pairs seen, and one block of features' ``delta`` (``feature_block × vocab``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from core.weights.sae_formats import SaeWeights

__all__ = ["MIN_COUNT", "Firing", "ablation", "attention_received", "firing", "sae_activations"]

MIN_COUNT = 3  # occurrences in the corpus before a token's mean activation is ranked


@dataclass(frozen=True)
class Firing:
    features: pd.DataFrame  # feature, firing_rate, mean_activation, n_contexts
    fires_on: pd.DataFrame  # feature, rank, token_id, mean_activation, occurrences
    contexts: pd.DataFrame  # feature, chunk, position, activation (descending per feature)


def sae_activations(x: torch.Tensor, sae: SaeWeights) -> torch.Tensor:
    """JumpReLU feature activations ``pre · [pre > threshold]`` of residual vectors ``x`` (..., d_model)."""
    pre = x @ sae.W_enc + sae.b_enc
    return pre * (pre > sae.threshold)


def _capture(model, layer: int) -> tuple[torch.utils.hooks.RemovableHandle, list[torch.Tensor]]:
    """A forward hook that keeps the output of ``model.model.layers[layer]`` (resid_post), float32."""
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append((output[0] if isinstance(output, tuple) else output).float())

    return model.model.layers[layer].register_forward_hook(hook), captured


@torch.no_grad()
def firing(
    model,
    sae: SaeWeights,
    layer: int,
    chunks: torch.Tensor,
    *,
    n_contexts: int = 8,
    k: int = 10,
    min_count: int = MIN_COUNT,
    batch: int = 32,
) -> Firing:
    """Stream ``chunks`` (n, context) through the model: per-feature firing statistics, top contexts and tokens."""
    n_sae, vocab, device = sae.d_sae, model.config.vocab_size, chunks.device
    fired = torch.zeros(n_sae, dtype=torch.long, device=device)
    act_sum = torch.zeros(n_sae, dtype=torch.float64, device=device)
    top_val = torch.full((n_sae, n_contexts), -1.0, device=device)
    top_idx = torch.full((n_sae, n_contexts), -1, dtype=torch.long, device=device)
    pair_keys, pair_sums = [], []
    context = chunks.shape[1]
    for start in range(0, len(chunks), batch):
        ids = chunks[start : start + batch]
        handle, captured = _capture(model, layer)
        try:
            model(input_ids=ids)
        finally:
            handle.remove()
        f = sae_activations(captured[0].reshape(-1, sae.d_model), sae)  # (positions, d_sae)
        on = f > 0
        fired += on.sum(0)
        act_sum += f.sum(0, dtype=torch.float64)
        flat = torch.arange(start * context, start * context + f.shape[0], device=device)
        merged_val = torch.cat([top_val, f.T], 1)
        merged_idx = torch.cat([top_idx, flat.expand(n_sae, -1)], 1)
        top_val, order = merged_val.topk(n_contexts, dim=1)
        top_idx = merged_idx.gather(1, order)
        pos, feat = on.nonzero(as_tuple=True)
        keys = feat * vocab + ids.reshape(-1)[pos]
        uniq, inverse = keys.unique(return_inverse=True)
        pair_keys.append(uniq.cpu())
        pair_sums.append(
            torch.zeros(len(uniq), dtype=torch.float64, device=device)
            .index_add_(0, inverse, f[pos, feat].double())
            .cpu()
        )
    positions = chunks.numel()
    keys = torch.cat(pair_keys)
    uniq, inverse = keys.unique(return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, torch.cat(pair_sums))
    occurrences = torch.bincount(chunks.reshape(-1).cpu(), minlength=vocab)
    fired, act_sum, top_val, top_idx = fired.cpu(), act_sum.cpu(), top_val.cpu(), top_idx.cpu()
    feat, token = uniq // vocab, uniq % vocab
    per_token = pd.DataFrame(
        {"feature": feat.numpy(), "token_id": token.numpy(), "occurrences": occurrences[token].numpy()}
    )
    per_token["mean_activation"] = sums.numpy() / per_token["occurrences"]
    per_token = per_token[per_token["occurrences"] >= min_count]
    per_token = per_token.sort_values(["feature", "mean_activation", "token_id"], ascending=[True, False, True])
    fires_on = per_token.groupby("feature", sort=False).head(k).copy()
    fires_on["rank"] = fires_on.groupby("feature").cumcount()
    valid = top_val > 0
    ctx = pd.DataFrame(
        {
            "feature": np.repeat(np.arange(n_sae), n_contexts),
            "flat": top_idx.reshape(-1).numpy(),
            "activation": top_val.reshape(-1).numpy(),
        }
    )[valid.reshape(-1).numpy()]
    flat = ctx.pop("flat")
    ctx["chunk"], ctx["position"] = flat // context, flat % context
    features = pd.DataFrame(
        {
            "feature": np.arange(n_sae),
            "firing_rate": (fired.double() / positions).numpy(),
            "mean_activation": (act_sum / fired.clamp_min(1)).numpy(),
            "n_contexts": valid.sum(1).numpy(),
        }
    )
    return Firing(
        features,
        fires_on[["feature", "rank", "token_id", "mean_activation", "occurrences"]].reset_index(drop=True),
        ctx[["feature", "chunk", "position", "activation"]].reset_index(drop=True),
    )


def _next_token_logprobs(model, ids: torch.Tensor, positions: torch.Tensor, layer: int, edit=None) -> torch.Tensor:
    handle = model.model.layers[layer].register_forward_hook(edit) if edit else None
    try:
        logits = model(input_ids=ids).logits
    finally:
        if handle:
            handle.remove()
    return logits[torch.arange(len(ids)), positions].float().log_softmax(-1)


@torch.no_grad()
def ablation(
    model,
    sae: SaeWeights,
    layer: int,
    chunks: torch.Tensor,
    contexts: pd.DataFrame,
    lens_tokens: dict[int, list[int]],
    *,
    k: int = 10,
    batch: int = 64,
    feature_block: int = 256,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-feature ``feature, effect_size, output_score, n_contexts``; ``promotes``: ``feature, rank, token_id,
    delta``) from removing each feature at its ``contexts`` (``firing``'s table). ``lens_tokens``: feature -> its
    output-lens top-k token ids (the weight-based reading the output score asks about)."""
    rows, promotes = [], []
    contexts = contexts.sort_values(["feature", "chunk", "position"])
    features = contexts["feature"].unique()
    for block_start in range(0, len(features), feature_block):
        block = features[block_start : block_start + feature_block]
        part = contexts[contexts["feature"].isin(block)]
        slot = {f: i for i, f in enumerate(block)}
        delta = torch.zeros(len(block), model.config.vocab_size, dtype=torch.float64)
        prob_drop = torch.zeros_like(delta)
        count = torch.zeros(len(block), dtype=torch.long)
        for start in range(0, len(part), batch):
            rows_b = part.iloc[start : start + batch]
            ids = chunks[torch.as_tensor(rows_b["chunk"].to_numpy())]
            pos = torch.as_tensor(rows_b["position"].to_numpy(), device=chunks.device)
            removed = (
                torch.as_tensor(rows_b["activation"].to_numpy(), dtype=torch.float32).to(chunks.device)[:, None]
                * sae.W_dec[torch.as_tensor(rows_b["feature"].to_numpy(), device=chunks.device)]
            )

            def edit(_module, _inputs, output, pos=pos, removed=removed):
                hidden = output[0] if isinstance(output, tuple) else output
                hidden = hidden.clone()
                hidden[torch.arange(len(pos)), pos] -= removed.to(hidden.dtype)
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

            clean = _next_token_logprobs(model, ids, pos, layer)
            ablated = _next_token_logprobs(model, ids, pos, layer, edit)
            where = torch.as_tensor([slot[f] for f in rows_b["feature"]])
            delta.index_add_(0, where, (clean - ablated).double().cpu())
            prob_drop.index_add_(0, where, (clean.exp() - ablated.exp()).double().cpu())
            count.index_add_(0, where, torch.ones(len(where), dtype=torch.long))
        delta /= count[:, None].clamp_min(1)
        prob_drop /= count[:, None].clamp_min(1)
        top = delta.topk(k, dim=1)
        for i, f in enumerate(block):
            lens = lens_tokens.get(int(f), [])
            rows.append(
                {
                    "feature": int(f),
                    "effect_size": float(top.values[i, 0]),
                    "output_score": float(prob_drop[i, lens].sum()) if lens else float("nan"),
                    "n_contexts": int(count[i]),
                }
            )
            promotes += [
                {"feature": int(f), "rank": r, "token_id": int(top.indices[i, r]), "delta": float(top.values[i, r])}
                for r in range(k)
            ]
    return pd.DataFrame(rows), pd.DataFrame(promotes)


@torch.no_grad()
def attention_received(model, sae: SaeWeights, layer: int, chunks: torch.Tensor, *, batch: int = 32) -> pd.DataFrame:
    """``feature, attention_log_ratio, firing_keys`` (module docstring): block ``layer + 1``'s attention to the
    positions where each feature fires, over uniform causal attention, streamed over ``chunks``."""
    n_sae, device = sae.d_sae, chunks.device
    reader = layer + 1
    if reader >= model.config.num_hidden_layers:
        return pd.DataFrame({"feature": np.arange(n_sae), "attention_log_ratio": np.nan, "firing_keys": 0})
    context = chunks.shape[1]
    # uniform causal attention: query q spreads 1 / (q + 1) over keys 0..q, so key k receives sum_{q>=k} 1/(q+1)
    uniform = (1.0 / torch.arange(1, context + 1, device=device, dtype=torch.float64)).flip(0).cumsum(0).flip(0)
    uniform[0] = 0.0  # the sink position is left out
    received = torch.zeros(model.config.num_attention_heads, n_sae, dtype=torch.float64, device=device)
    expected = torch.zeros(n_sae, dtype=torch.float64, device=device)
    keys = torch.zeros(n_sae, dtype=torch.long, device=device)
    for start in range(0, len(chunks), batch):
        ids = chunks[start : start + batch]
        handle, captured = _capture(model, layer)
        try:
            attentions = model(input_ids=ids, output_attentions=True).attentions
        finally:
            handle.remove()
        if attentions is None or attentions[reader] is None:
            raise ValueError("the model returned no attention probabilities: load it with attn_implementation='eager'")
        on = (sae_activations(captured[0], sae) > 0).double()  # (b, pos, d_sae)
        on[:, 0] = 0.0
        per_key = attentions[reader].double().sum(2)  # (b, heads, key): attention each key receives
        received += torch.einsum("bhk,bkf->hf", per_key, on)
        expected += torch.einsum("k,bkf->f", uniform, on)
        keys += on.sum((0, 1)).long()
    ratio = (received / expected.clamp_min(1e-12)).mean(0).clamp_min(1e-12).log()
    ratio[keys == 0] = float("nan")
    return pd.DataFrame(
        {"feature": np.arange(n_sae), "attention_log_ratio": ratio.cpu().numpy(), "firing_keys": keys.cpu().numpy()}
    )
