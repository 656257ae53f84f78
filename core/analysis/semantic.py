"""Semantic coherence of a feature's top-k vocabulary tokens: token sets, three metrics, calibration, the rule.

A feature is *semantic* on one side (``"output"``: its decoder direction through the output lens;
``"input"``: its encoder direction against the embeddings) when its top-k tokens form a coherent set.

The set (``token_sets``). The lens keeps the ``CANDIDATES`` best tokens of each direction; the set is the first k
*forms* among them: tokens of class ``normal`` only (``core.weights.vocab``: special, unused, byte-fallback, whitespace
and padding ids are skipped) and one form per normalised string (``normalise_token``: space markers 'Ġ' / '▁' and
outer whitespace stripped, case-folded — so " the", "The", " THE" are one form, represented by its best-ranked
token). Skipped ids and merged variants are counted per feature (``n_excluded``, ``n_collapsed``) and the forms
are stored (``top_forms``). A set of fewer than two forms has no coherence (NaN: never passes).

Three metrics per (sample, feature, side), all "larger = more coherent", for every k of ``K_GRID`` at once:

(a) ``levenshtein``: mean over the k(k-1)/2 pairs of forms of rapidfuzz's normalised Levenshtein similarity
    ``1 - dist(a, b) / max(|a|, |b|)``.
(b) ``cosine``: mean pairwise cosine of the forms' vectors (unembedding rows on the output side, embedding rows
    on the input side) after *whitening* (``Whitening``, "all-but-the-top", Mu & Viswanath 2018): rows centred
    on the mean normal-token row and the dominant principal components projected out — real embedding matrices
    are strongly anisotropic (a common mean direction, a few high-variance directions, hub tokens), which makes
    any raw cosine large. The first form (the token the direction points at) is left out of the pairs: its
    neighbours resemble it because they were selected for it; the rest of the set must resemble each other.
(c) ``concentration``: how far the set's own tokens stand out of the direction's distribution over the whole
    vocabulary: ``(mean lens value of the k forms − mean) / std``, on both sides. Temperature-free: the input
    side's products ``e · σW_E`` are no logits (a softmax over them is within 1e-4 nats of uniform on Llama, so
    its entropy ranks projection variance, not peaked tokens); on the output side a softmax entropy is dominated
    by its single largest logit, so hub tokens (rows of large norm) make it peak for any direction, and
    skipped tokens (``<unused>`` rows) would count. The entropy is kept in the lens stats for the record.

Calibration (never a guessed constant): each metric's threshold is the ``quantile`` (default P99) of the same
metric over null directions through the same lens of the same SAE (``calibrate``); which null is a choice of
the caller (``core.analysis.classify``: the SAE-matched null by default, the isotropic one for the record).

THE RULE (the only place it is defined, ``combine``): a side is semantic when AT LEAST TWO of the three
tests pass (majority vote). Each metric has a blind spot — Levenshtein misses synonym sets, cosine rewards
whatever structure the embedding has, concentration says the distribution is peaked, not that its peak is
coherent. Continuous version (AUROC, plots): each metric rescaled to ``(x - null median) / (null threshold -
null median)`` (1 = at its threshold); ``semantic_score`` is the second largest of the three, so
``semantic == semantic_score > 1`` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from core.analysis.statistics import DEFAULT_QUANTILE

METRICS = ("levenshtein", "cosine", "concentration")
SPACE_MARKERS = ("Ġ", "▁")
MIN_PASSES = 2  # of len(METRICS): the majority rule
K_GRID = (5, 10, 20)  # set sizes measured (the sensitivity of C1 to k); the default k is the engine's top_k
# Bytes of one temporary of the chunked vocabulary computations (whitening, cosine coherence): at Gemma-2's
# d = 2304, 3640 rows of float64 / 364 directions' top-20 rows of float32; small models keep whole blocks.
CHUNK_BYTES = 64 << 20
CANDIDATES = 50  # best tokens each lens keeps per direction: room for max(K_GRID) forms after hygiene
DOMINANCE = 5.0  # a principal component is dominant when its variance exceeds 5x the mean component variance
NULL_QUANTILE_GRID = (0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999)


def normalise_token(token: str) -> str:
    """Token string without the tokenizer's space markers ('Ġ', '▁') and outer whitespace, case-folded."""
    for marker in SPACE_MARKERS:
        token = token.replace(marker, " ")
    return token.strip().casefold()


@dataclass(frozen=True)
class TokenSets:
    """The first ``k_max`` forms of each (sample, feature)'s candidate list (module doc, "The set").

    ``ids[r, j]``: token id of form j of row r (-1 where the row has fewer forms); ``forms[r]``: the normalised
    strings; ``excluded[r, j]`` / ``collapsed[r, j]``: non-normal ids skipped / variants merged among the
    candidates scanned up to form j (the totals over all candidates where form j does not exist)."""

    keys: pd.DataFrame  # sample, feature
    ids: np.ndarray
    values: np.ndarray  # (n, k_max) the lens value of each form's token (NaN where no form)
    forms: list[list[str]]
    excluded: np.ndarray
    collapsed: np.ndarray

    def counts(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(n_excluded, n_collapsed)`` per row for sets of size ``k``."""
        return self.excluded[:, k - 1], self.collapsed[:, k - 1]


def token_sets(tokens: pd.DataFrame, normal: np.ndarray, k_max: int) -> TokenSets:
    """Sets of ``tokens`` (rows of an ``*_lens_tokens`` table; ``side == 'top'`` used) given ``normal``, a
    boolean per token id (``core.weights.vocab``: token_class == 'normal')."""
    top = tokens[tokens["side"] == "top"].sort_values(["sample", "feature", "rank"])
    keys = top[["sample", "feature"]].drop_duplicates().reset_index(drop=True)
    sizes = top.groupby(["sample", "feature"], sort=True).size().to_numpy()
    ids_all = top["token_id"].to_numpy(dtype=np.int64)
    values_all = top["value"].to_numpy(dtype=np.float64)
    strings = top["token"].tolist()
    n = len(keys)
    ids = np.full((n, k_max), -1, dtype=np.int64)
    values = np.full((n, k_max), np.nan)
    excluded = np.zeros((n, k_max), dtype=np.int64)
    collapsed = np.zeros((n, k_max), dtype=np.int64)
    forms: list[list[str]] = []
    normalised: dict[str, str] = {}  # each distinct token string normalised once (a vocabulary, not every candidate)
    start = 0
    for r, size in enumerate(sizes):
        seen: list[str] = []
        skipped = merged = 0
        for i in range(start, start + size):
            if not normal[ids_all[i]]:
                skipped += 1
                continue
            form = normalised.get(strings[i])
            if form is None:
                form = normalised[strings[i]] = normalise_token(strings[i])
            if form in seen:
                merged += 1
                continue
            ids[r, len(seen)], values[r, len(seen)] = ids_all[i], values_all[i]
            excluded[r, len(seen)], collapsed[r, len(seen)] = skipped, merged
            seen.append(form)
            if len(seen) == k_max:
                break
        excluded[r, len(seen) :], collapsed[r, len(seen) :] = skipped, merged
        forms.append(seen)
        start += size
    return TokenSets(keys, ids, values, forms, excluded, collapsed)


def _prefix_means(pairwise: np.ndarray, ks: tuple[int, ...], first: int = 0) -> dict[int, np.ndarray]:
    """Per k: mean off-diagonal entry of the leading block ``[first:k, first:k]`` of each (n, K, K) matrix."""
    out = {}
    for k in ks:
        block = pairwise[:, first:k, first:k]
        m = k - first
        out[k] = (block.sum(axis=(1, 2)) - np.trace(block, axis1=1, axis2=2)) / (m * (m - 1))
    return out


def levenshtein_coherence(forms: list[str], ks: tuple[int, ...]) -> dict[int, float]:
    """Per k: mean pairwise normalised Levenshtein similarity of the first k forms (NaN below k forms)."""
    out = {k: float("nan") for k in ks}
    usable = [k for k in ks if len(forms) >= k]
    if usable:
        sim = process.cdist(forms, forms, scorer=Levenshtein.normalized_similarity, dtype=np.float32)
        out |= {k: float(v[0]) for k, v in _prefix_means(sim[None].astype(np.float64), tuple(usable)).items()}
    return out


@dataclass(frozen=True)
class Whitening:
    """ "All-but-the-top" (Mu & Viswanath 2018): ``x -> P (x - mean)``, P projecting out the ``components``
    (D, d) — the principal components whose variance exceeds ``DOMINANCE`` times the mean component variance
    of the centred normal-token rows (D chosen from the matrix, stored as ``n_components``)."""

    mean: np.ndarray
    components: np.ndarray

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    def apply(self, x: np.ndarray) -> np.ndarray:
        centred = x - self.mean
        return centred - (centred @ self.components.T) @ self.components


def _chunk_rows(most: int, row_bytes: int) -> int:
    """Rows per block: at most ``most``, and at most ``CHUNK_BYTES`` of temporaries of ``row_bytes`` each."""
    return max(1, min(most, CHUNK_BYTES // row_bytes))


def whitening(vectors: np.ndarray, normal: np.ndarray, chunk: int = 65536) -> Whitening:
    """The whitening of a (vocab, d) matrix estimated on its normal-token rows (blocks of at most ``chunk``
    rows and ``CHUNK_BYTES`` of float64)."""
    rows = np.flatnonzero(normal)
    if len(rows) < 2:
        raise ValueError("cannot whiten a vocabulary with fewer than two normal tokens")
    d = vectors.shape[1]
    chunk = _chunk_rows(chunk, 8 * d)
    total, gram = np.zeros(d), np.zeros((d, d))
    for start in range(0, len(rows), chunk):
        block = np.asarray(vectors[rows[start : start + chunk]], dtype=np.float64)
        total += block.sum(axis=0)
        gram += block.T @ block
    mean = total / len(rows)
    cov = gram / len(rows) - np.outer(mean, mean)
    eigvals, eigvecs = np.linalg.eigh(cov)  # ascending
    dominant = eigvals > DOMINANCE * eigvals.mean()
    return Whitening(mean.astype(np.float32), eigvecs[:, dominant].T[::-1].astype(np.float32).copy())


def cosine_coherence(
    ids: np.ndarray, vectors: np.ndarray, white: Whitening, ks: tuple[int, ...], chunk: int = 2048
) -> dict[int, np.ndarray]:
    """Per k: mean pairwise cosine of the whitened vectors of forms 2..k of each row of the (n, K) id matrix
    (-1 = no form: NaN for every k the row cannot fill); blocks of at most ``chunk`` rows and ``CHUNK_BYTES``
    per (rows, k, d) float32 temporary."""
    n, k_max = ids.shape
    chunk = _chunk_rows(chunk, 4 * k_max * vectors.shape[1])
    out = {k: np.full(n, np.nan) for k in ks}
    for start in range(0, n, chunk):
        block = ids[start : start + chunk]
        v = white.apply(np.asarray(vectors[np.where(block < 0, 0, block)], dtype=np.float32))
        v /= np.maximum(np.linalg.norm(v, axis=2, keepdims=True), np.finfo(np.float32).tiny)
        gram = np.einsum("ckd,cjd->ckj", v, v).astype(np.float64)
        filled = (block >= 0).sum(axis=1)
        for k, values in _prefix_means(gram, ks, first=1).items():
            values[filled < k] = np.nan
            out[k][start : start + chunk] = values
    return out


def concentration(sets: TokenSets, mean: np.ndarray, std: np.ndarray, ks: tuple[int, ...]) -> dict[int, np.ndarray]:
    """Per k: ``(mean lens value of the first k forms − mean) / std`` (``mean``, ``std``: over the whole vocabulary,
    aligned with ``sets.keys``); NaN where a row has fewer than k forms."""
    return {k: (sets.values[:, :k].mean(axis=1) - mean) / std for k in ks}


def coherence_metrics(
    sets: TokenSets,
    mean: np.ndarray,
    std: np.ndarray,
    vectors: np.ndarray,
    white: Whitening,
    ks: tuple[int, ...] = K_GRID,
) -> dict[int, pd.DataFrame]:
    """Per k: ``sample, feature, levenshtein, cosine, concentration, n_excluded, n_collapsed`` of one side;
    ``mean`` / ``std``: each row's lens moments over the vocabulary, aligned with ``sets.keys``."""
    lev = [levenshtein_coherence(f, ks) for f in sets.forms]
    cos = cosine_coherence(sets.ids, vectors, white, ks)
    conc = concentration(sets, mean, std, ks)
    out = {}
    for k in ks:
        excluded, collapsed = sets.counts(k)
        out[k] = sets.keys.assign(
            levenshtein=[v[k] for v in lev],
            cosine=cos[k],
            concentration=conc[k],
            n_excluded=excluded,
            n_collapsed=collapsed,
        )
    return out


def string_permutation_null(sets: TokenSets, forms: list[str], k: int, n: int, seed: int = 0) -> np.ndarray:
    """Levenshtein coherence of ``n`` random sets of k forms with matched string lengths: each copies the form
    lengths of a random row of ``sets`` (one with k forms) and fills them with random ``forms`` (the vocabulary's
    normal forms) of the same length (the nearest length where none has it) — the string metric's own null, blind
    to any embedding."""
    by_length: dict[int, list[str]] = {}
    for form in forms:
        by_length.setdefault(len(form), []).append(form)
    if not by_length:
        raise ValueError("no normal forms to draw a string-permutation null from")
    lengths = {len(form) for row in sets.forms for form in row}
    nearest = {n: min(by_length, key=lambda m: (abs(m - n), m)) for n in lengths}
    rng = np.random.default_rng(seed)
    rows = [r for r in sets.forms if len(r) >= k]
    if not rows:
        raise ValueError(f"no set of {k} forms to copy string lengths from")
    out = np.empty(n)
    for i in range(n):
        template = rows[rng.integers(len(rows))][:k]
        drawn = [by_length[nearest[len(f)]][rng.integers(len(by_length[nearest[len(f)]]))] for f in template]
        out[i] = levenshtein_coherence(drawn, (k,))[k]
    return out


@dataclass(frozen=True)
class Calibration:
    """Per metric: the null's median and threshold (its ``quantile``), and the null's quantile table."""

    thresholds: dict[str, float]
    medians: dict[str, float]
    quantile: float
    null_size: int
    null_quantiles: pd.DataFrame  # metric, q, value

    def as_frame(self) -> pd.DataFrame:
        """One row per metric: ``metric, threshold, null_median, quantile, null_size``."""
        return pd.DataFrame(
            {
                "metric": list(self.thresholds),
                "threshold": list(self.thresholds.values()),
                "null_median": [self.medians[m] for m in self.thresholds],
                "quantile": self.quantile,
                "null_size": self.null_size,
            }
        )


def calibrate(
    null: pd.DataFrame, quantile: float = DEFAULT_QUANTILE, metrics: tuple[str, ...] = METRICS
) -> Calibration:
    """Thresholds = the ``quantile`` of each metric over the null rows (linear interpolation; NaN rows — sets of
    fewer than two forms — are left out)."""
    values = {m: null[m].dropna().to_numpy(dtype=np.float64) for m in metrics}
    empty = [m for m, v in values.items() if len(v) == 0]
    if empty:
        raise ValueError(f"cannot calibrate {', '.join(empty)} on an empty null")
    grid = pd.DataFrame(
        [(m, q, float(np.quantile(values[m], q))) for m in metrics for q in NULL_QUANTILE_GRID],
        columns=["metric", "q", "value"],
    )
    return Calibration(
        thresholds={m: float(np.quantile(values[m], quantile)) for m in metrics},
        medians={m: float(np.median(values[m])) for m in metrics},
        quantile=quantile,
        null_size=len(null),
        null_quantiles=grid,
    )


def semantic_rule(passes: np.ndarray) -> np.ndarray:
    """THE RULE on a (n, len(METRICS)) boolean matrix of passed tests: at least ``MIN_PASSES`` per row."""
    return passes.sum(axis=1) >= MIN_PASSES


def combine(metrics: pd.DataFrame, calibration: Calibration) -> pd.DataFrame:
    """Apply THE RULE: per row, pass flags ``<metric>_pass``, rescaled scores, ``n_passes``,
    ``semantic_score`` (second-largest rescaled score) and ``semantic`` (``semantic_rule``)."""
    out = metrics.copy()
    scaled = []
    for m in calibration.thresholds:
        t, med = calibration.thresholds[m], calibration.medians[m]
        out[f"{m}_pass"] = out[m] > t
        scale = (t - med) if t > med else 1.0
        scaled.append(((out[m] - med) / scale).fillna(-np.inf).to_numpy())
    stacked = np.sort(np.stack(scaled, axis=1), axis=1)  # ascending
    out["n_passes"] = out[[f"{m}_pass" for m in calibration.thresholds]].sum(axis=1).astype(int)
    out["semantic_score"] = stacked[:, -MIN_PASSES]
    out["semantic"] = semantic_rule(out[[f"{m}_pass" for m in calibration.thresholds]].to_numpy())
    return out
