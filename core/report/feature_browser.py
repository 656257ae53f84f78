"""A static HTML feature browser per SAE: every feature's top output tokens (decoder → unembedding lens),
top input tokens (embedding → encoder lens) and classes, searchable by feature index or token.

One self-contained file (the data are embedded as JSON, no server, no network), built from the stored tables
``output_lens_tokens``, ``input_lens_tokens`` and ``feature_classes``; ``<file>#123`` opens with feature 123
looked up, ``<file>#letter`` with the features whose top tokens contain "letter".
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from string import Template

import pandas as pd

from core.registry import SaeRef
from core.store import atomic

TOP_TOKENS = 10  # tokens shown per lens and feature
SHOWN = 200  # table rows drawn at once (the count says how many more match)
FLAGS = ["output_predicting", "semantic", "semantic_output", "semantic_input", "token_identity", "heavy_tailed"]


def browser_path(folder: Path, ref: SaeRef) -> Path:
    """Where the browser of ``ref`` lives under ``folder``: ``<release>/<sae_id>.html`` (the SAE id's folders
    kept, so the name needs no escaping)."""
    return folder / ref.release / f"{ref.sae_id}.html"


def rounded(value: float, digits: int) -> float | None:
    """``value`` to ``digits`` decimals; None (JSON null) where it is not finite, which JSON cannot hold."""
    return round(float(value), digits) if math.isfinite(value) else None


def top_tokens(rows: pd.DataFrame, top: int = TOP_TOKENS) -> dict[int, list[list]]:
    """Per feature, its ``top`` best tokens of one lens table by rank, each ``[token, value]`` (value to 3
    decimals); only the SAE's features (sample 'feature'), top side."""
    best = rows[(rows["sample"] == "feature") & (rows["side"] == "top") & (rows["rank"] <= top)]
    best = best.sort_values(["feature", "rank"])
    pairs = [[token, rounded(value, 3)] for token, value in zip(best["token"], best["value"])]
    grouped = pd.Series(pairs, index=best["feature"].to_numpy(), dtype=object).groupby(level=0).agg(list)
    return {int(feature): tokens for feature, tokens in grouped.items()}


def feature_records(output_tokens: pd.DataFrame, input_tokens: pd.DataFrame, classes: pd.DataFrame) -> list[dict]:
    """One record per feature of ``classes``: index ``f``, top-k z ``z``, the class ``flags`` it has and its
    ``out`` / ``in`` top tokens."""
    out, inp = top_tokens(output_tokens), top_tokens(input_tokens)
    rows = classes.sort_values("feature")
    return [
        {
            "f": int(row["feature"]),
            "z": rounded(row["topk_z"], 2),
            "flags": [f for f in FLAGS if row[f]],
            "out": out.get(int(row["feature"]), []),
            "in": inp.get(int(row["feature"]), []),
        }
        for row in rows[["feature", "topk_z", *FLAGS]].to_dict("records")
    ]


def render(ref: SaeRef, records: list[dict]) -> str:
    """The browser page of ``ref`` holding ``records`` (``feature_records``)."""
    n_output = sum("output_predicting" in r["flags"] for r in records)
    title = f"{ref.release} · {ref.sae_id}"
    summary = (
        f"layer {ref.layer}, width {ref.width or '?'}, L0 {ref.l0 if ref.l0 is not None else '?'}: "
        f"{len(records)} features, {n_output} output-predicting"
    )
    data = json.dumps({"features": records, "shown": SHOWN}).replace("<", "\\u003c")
    return PAGE.substitute(title=html.escape(title), summary=html.escape(summary), top=TOP_TOKENS, data=data)


def write_browser(
    folder: Path, ref: SaeRef, output_tokens: pd.DataFrame, input_tokens: pd.DataFrame, classes: pd.DataFrame
) -> Path:
    """Write the browser of ``ref`` (atomically) under ``folder``; returns its path."""
    return atomic.write_text(
        browser_path(folder, ref), render(ref, feature_records(output_tokens, input_tokens, classes))
    )


PAGE = Template("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>$title — feature browser</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1d1d1f; }
h1 { font-size: 20px; margin: 0 0 4px; } p { margin: 4px 0 12px; color: #555; }
input[type=search] { font-size: 16px; padding: 6px 10px; width: 28em; }
table { border-collapse: collapse; margin-top: 12px; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: 6px 8px; text-align: left; vertical-align: top; }
th { font-weight: 600; color: #555; font-size: 12px; white-space: nowrap; }
.tok { display: inline-block; font-family: ui-monospace, monospace; white-space: pre; background: #eef1f8;
       border: 1px solid #cfd6e6; border-radius: 4px; padding: 0 4px; margin: 1px 2px; }
.flag { display: inline-block; font-size: 12px; background: #e7f5ec; border-radius: 4px; padding: 0 4px; margin: 1px; }
</style></head>
<body>
<h1>$title</h1>
<p>$summary. Top $top tokens per lens (hover a token for its value); output: decoder → final norm →
unembedding (softcap applied), input: token embedding → encoder.</p>
<label>Feature index or token: <input id="lookup" type="search" autofocus placeholder="e.g. 123 or letter"></label>
<label><input id="only-output" type="checkbox"> output-predicting only</label>
<div id="count"></div>
<table><thead><tr><th>feature</th><th>classes</th><th>top-k z</th><th>top output tokens</th><th>top input tokens</th>
</tr></thead><tbody id="rows"></tbody></table>
<script id="features" type="application/json">$data</script>
<script>
const data = JSON.parse(document.getElementById("features").textContent);
const lookup = document.getElementById("lookup"), only = document.getElementById("only-output");

function matches(record, query) {
  if (query === "") return true;
  if (/^\\d+$$/.test(query)) return record.f === Number(query);
  const needle = query.toLowerCase();
  return record.out.concat(record.in).some(([token]) => token.toLowerCase().includes(needle));
}

function cell(children) {
  const td = document.createElement("td");
  td.append(...children);
  return td;
}

function chip(className, text, title) {
  const span = document.createElement("span");
  span.className = className;
  span.textContent = text;
  if (title !== undefined) span.title = title;
  return span;
}

function row(record) {
  const tr = document.createElement("tr");
  tr.dataset.feature = record.f;
  const tokens = (list) => list.map(([token, value]) => chip("tok", JSON.stringify(token).slice(1, -1), String(value)));
  tr.append(cell([String(record.f)]), cell(record.flags.map((flag) => chip("flag", flag))), cell([String(record.z)]),
            cell(tokens(record.out)), cell(tokens(record.in)));
  return tr;
}

function render() {
  const query = lookup.value.trim();
  const hits = data.features.filter(
    (r) => (!only.checked || r.flags.includes("output_predicting")) && matches(r, query));
  document.getElementById("rows").replaceChildren(...hits.slice(0, data.shown).map(row));
  document.getElementById("count").textContent =
    hits.length > data.shown ? `$${hits.length} features match; the first $${data.shown} are shown`
                             : `$${hits.length} features match`;
  history.replaceState(null, "", query ? "#" + encodeURIComponent(query) : location.pathname);
}

lookup.value = decodeURIComponent(location.hash.slice(1));
lookup.addEventListener("input", render);
only.addEventListener("change", render);
render();
</script></body></html>
""")
