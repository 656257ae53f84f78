"""Detection power on the planted releases: per strength bin, and per hard class (``core.testbeds.planted``, "hard
cases").
Pure functions of a per-feature class frame (``feature_classes``-style: one row per SAE feature with columns
``sae_id, feature, output_predicting, semantic, semantic_input, semantic_output``; ``heavy_tailed`` is used when
present) and the planted truth dict (``planted_truth.json``).

* ``power_table``: the planted semantic features of every SAE (``saes[sae_id].semantic_features``), each with its
  planted direction noise sigma_f (``saes[sae_id].hard_cases.strength[f]`` where the strength continuum is on,
  else the release's scalar ``params.direction_noise``), binned by sigma. Per bin b with n_b features of which
  x_b are called ``column``: power_b = x_b / n_b with the 95 % Wilson score interval
  ``(p + z^2 / 2n +- z sqrt(p (1 - p) / n + z^2 / 4n^2)) / (1 + z^2 / n)``, z = 1.96
  (``core.analysis.statistics.wilson_interval``). A planted decoder is ``unit(unit(c / g) + sigma unit(N))``: its cosine
  with the planted direction is ~ 1 / sqrt(1 + sigma^2), so power should fall with sigma.
* ``hard_case_table``: per hard class (``single_token``, ``coherent_flat``, ``input_only``, ``string_free_group``)
  the n features over all SAEs, the fraction called ``output_predicting``, ``semantic``, ``semantic_input``,
  ``semantic_output`` (and ``heavy_tailed``), the expected outcome (``truth.hard.expected``: column -> bool) and
  whether it holds: an expected True holds when the fraction is >= ``min_rate`` (0.9), an expected False when
  it is <= ``max_rate`` (0.05).
* ``class_recovery_table``: per class column, precision and recall of the calls against what the truth implies:
  a planted semantic feature is expected in every class but ``token_identity`` (not predicted), a hard feature
  as ``truth.hard.expected`` says (columns not named there are not judged), every other feature in none.
  ``max_noise`` leaves out planted semantic features whose direction noise exceeds it (signal at or below the
  null: what the power table measures instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from core.analysis.statistics import wilson_interval

__all__ = ["DEFAULT_BINS", "class_recovery_table", "hard_case_table", "planted_strengths", "power_table"]

DEFAULT_BINS: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2)
CALL_COLUMNS = ("output_predicting", "semantic", "semantic_input", "semantic_output", "heavy_tailed", "token_identity")
RECOVERED = ("output_predicting", "semantic_output", "semantic_input", "semantic", "token_identity")
SEMANTIC_EXPECTED = {"output_predicting": True, "semantic_output": True, "semantic_input": True, "semantic": True}


def planted_strengths(truth: dict[str, Any]) -> pd.DataFrame:
    """``sae_id, feature, direction_noise`` of every planted semantic feature in ``truth``."""
    default = float(truth.get("params", {}).get("direction_noise", float("nan")))
    rows = []
    for sae_id, sae in truth["saes"].items():
        strength = sae.get("hard_cases", {}).get("strength", {})
        for f in sae["semantic_features"]:
            rows.append((sae_id, int(f["index"]), float(strength.get(str(f["index"]), default))))
    return pd.DataFrame(rows, columns=["sae_id", "feature", "direction_noise"])


def _called(classes: pd.DataFrame, keys: pd.DataFrame, column: str) -> pd.DataFrame:
    merged = keys.merge(classes[["sae_id", "feature", column]], on=["sae_id", "feature"], how="left", validate="1:1")
    if merged[column].isna().any():
        missing = merged[merged[column].isna()][["sae_id", "feature"]].head(3).to_dict("records")
        raise ValueError(f"classes lack planted features, e.g. {missing}")
    return merged.assign(**{column: merged[column].astype(bool)})


def power_table(
    classes: pd.DataFrame, truth: dict[str, Any], column: str = "output_predicting", bins: Sequence[float] | None = None
) -> pd.DataFrame:
    """Per strength bin ``[lo, hi)`` (the last one closed) of the planted direction noise: ``bin, lo, hi, n,
    called, power`` (= called / n) and ``ci_low, ci_high`` (95 % Wilson), over the planted semantic features;
    features outside the bins are dropped. Empty bins get n = 0 and NaN power. ``bins`` (edges) default: five
    equal bins over the truth's ``hard.params.strength_noise`` range, else ``DEFAULT_BINS``."""
    if bins is None:
        noise = truth.get("hard", {}).get("params", {}).get("strength_noise")
        bins = tuple(np.round(np.linspace(noise[0], noise[1], 6), 6)) if noise else DEFAULT_BINS
    edges = np.asarray(bins, dtype=float)
    frame = _called(classes, planted_strengths(truth), column)
    idx = np.digitize(frame["direction_noise"].to_numpy(), edges[1:-1], right=False)
    inside = (frame["direction_noise"] >= edges[0]) & (frame["direction_noise"] <= edges[-1])
    rows = []
    for b, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        hit = frame[column].to_numpy()[(idx == b) & inside.to_numpy()]
        n, x = len(hit), int(hit.sum())
        lo_ci, hi_ci = wilson_interval(x, n)
        rows.append(
            {
                "bin": f"[{lo:g}, {hi:g}{']' if b == len(edges) - 2 else ')'}",
                "lo": lo,
                "hi": hi,
                "n": n,
                "called": x,
                "power": x / n if n else float("nan"),
                "ci_low": lo_ci,
                "ci_high": hi_ci,
            }
        )
    return pd.DataFrame(rows)


def hard_case_table(
    classes: pd.DataFrame, truth: dict[str, Any], min_rate: float = 0.9, max_rate: float = 0.05
) -> pd.DataFrame:
    """Per hard class: ``hard_class, n``, the fraction called in each of ``CALL_COLUMNS`` present in ``classes``,
    ``expected`` (e.g. "output_predicting=False, semantic_input=True") and ``holds`` (every expected column's
    fraction >= min_rate where True is expected, <= max_rate where False is)."""
    expected: dict[str, dict[str, bool]] = truth.get("hard", {}).get("expected", {})
    columns = [c for c in CALL_COLUMNS if c in classes.columns]
    rows = []
    for name, outcome in expected.items():
        keys = pd.DataFrame(
            [
                (sae_id, int(f))
                for sae_id, sae in truth["saes"].items()
                for f in sae.get("hard_cases", {}).get(name, [])
            ],
            columns=["sae_id", "feature"],
        )
        row: dict[str, Any] = {"hard_class": name, "n": len(keys)}
        for c in columns:
            row[c] = float(_called(classes, keys, c)[c].mean()) if len(keys) else float("nan")
        row["expected"] = ", ".join(f"{c}={v}" for c, v in outcome.items())
        row["holds"] = bool(len(keys)) and all(
            (row[c] >= min_rate) if want else (row[c] <= max_rate) for c, want in outcome.items() if c in row
        )
        rows.append(row)
    return pd.DataFrame(rows)


def class_recovery_table(classes: pd.DataFrame, truth: dict[str, Any], max_noise: float | None = None) -> pd.DataFrame:
    """Per class column of ``RECOVERED`` present in ``classes``: ``class, n_expected`` (features the truth expects
    in the class), ``n_judged`` (features with an expectation), ``called, true_positive, precision, recall`` (module
    doc)."""
    strengths = planted_strengths(truth).set_index(["sae_id", "feature"])["direction_noise"]
    hard_expected: dict[str, dict[str, bool]] = truth.get("hard", {}).get("expected", {})
    expectations: dict[tuple[str, int], dict[str, bool]] = {}
    for sae_id, sae in truth["saes"].items():
        for name, outcome in hard_expected.items():
            for f in sae.get("hard_cases", {}).get(name, []):
                expectations[(sae_id, int(f))] = outcome
        for f in sae["semantic_features"]:
            key = (sae_id, int(f["index"]))
            weak = max_noise is not None and strengths.get(key, 0.0) > max_noise
            expectations[key] = {} if weak else SEMANTIC_EXPECTED
    rows = []
    keys = list(zip(classes["sae_id"].astype(str), classes["feature"].astype(int), strict=True))
    for column in (c for c in RECOVERED if c in classes.columns):
        want = [expectations.get(key, {c: False for c in RECOVERED}).get(column) for key in keys]
        judged = np.array([w is not None for w in want])
        expected = np.array([bool(w) for w in want])
        called = classes[column].astype(bool).to_numpy()
        tp = int((called & expected & judged).sum())
        n_called, n_expected = int((called & judged).sum()), int((expected & judged).sum())
        rows.append(
            {
                "class": column,
                "n_expected": n_expected,
                "n_judged": int(judged.sum()),
                "called": n_called,
                "true_positive": tp,
                "precision": tp / n_called if n_called else float("nan"),
                "recall": tp / n_expected if n_expected else float("nan"),
            }
        )
    return pd.DataFrame(rows)
