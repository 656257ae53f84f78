"""The pipeline, one function per asset: from an SAE reference, the hub and the stored tables to a
``StageOutput`` (tables, facts, checks). The assets (``assets/``) only read their inputs, call one of these
and hand the output to Dagster (``assets.common.materialize``); tests call the same functions.

Data flows one way: ``sae_weights`` / ``model_weights`` (fetch and verify) → ``lens_tables`` /
``circuit_tables`` (the engine; ``core.stages``) → ``feature_classes`` (from the stored tables) →
``activation_agreement`` (releases with a corpus) → ``claim_statistics`` (per release) → plots and report.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from core.analysis.agreement import agreement_stage
from core.analysis.claims import AGREEMENT_TABLES, CLASS_TABLES, missing_saes, results_from_tables, verdict_table
from core.analysis.classify import NULLS, SIDES
from core.analysis.profiles import CIRCUIT_STATS_READ, PROFILE_STATS
from core.analysis.semantic import CANDIDATES
from core.analysis.statistics import DEFAULT_QUANTILE, wilson_interval
from core.analysis.verdicts import VERDICTS
from core.lens.control import control_sae
from core.lens.frames import SUMMARY_COLUMNS, with_sae
from core.registry import SaeRef, get_release
from core.report.feature_browser import write_browser
from core.report.neuronpedia import (
    NeuronpediaSource,
    dashboard_frame,
    dashboard_tokens,
    dashboard_top_logits,
    write_json_export,
)
from core.stage_output import Fact, Markdown, StageOutput
from core.stages import LENS_SIDES, EngineSettings, circuit_stage, class_stage, lens_stage
from core.store.storage import TableStore
from core.store.table_checks import Check, RowTally, finite, ids_in_range, rows_match
from core.testbeds.truth import load_truth
from core.weights.discovery import fetch_corpus, fetch_model, fetch_runnable_model, fetch_sae, load_sae, model_geometry
from core.weights.hub import Hub, fingerprint
from core.weights.model_weights import CONFIG_FILE, INDEX_FILE, TOKENIZER_FILE, ModelCheckpoint
from core.weights.sae_formats import FORMATS
from core.weights.vocab import normal_tokens, vocabulary_table

STAT_COLUMNS = [*SUMMARY_COLUMNS, "top_mean"]  # the engine statistics every lens and circuit row carries
LENS_TABLES = tuple(f"{lens}_lens_{part}" for lens in LENS_SIDES for part in ("tokens", "stats"))
# The columns feature_classes reads of its stored inputs, where not all (the lens tables' release / sae_id / layer
# and the circuits' top-token lists are most of what a read would hold).
LENS_TOKENS_READ = ["sample", "feature", "side", "rank", "token_id", "token", "value"]
CLASS_READS = {
    **{f"{side}_lens_tokens": LENS_TOKENS_READ for side in LENS_SIDES},
    "vocabulary": ["token_id", "token_class"],
    "circuit_stats": CIRCUIT_STATS_READ,
}
CALIBRATED = 7  # thresholds per null: top-k z + three coherence metrics per side (+ Levenshtein's string null per side)
CORPUS_CONTEXT = 64  # tokens per corpus window of the activation measurements
STATISTICS_INPUTS = (*CLASS_TABLES, *AGREEMENT_TABLES)  # what claim_statistics reads of every release


def _dtype_name(settings: EngineSettings) -> str:
    return str(settings.compute_dtype).removeprefix("torch.")


def _file_sizes(files: list[Path], root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in files}


def sae_weights(ref: SaeRef, hub: Hub) -> StageOutput:
    """One SAE's weights fetched from the hub cache and validated (shapes, dtype, finite values).

    Stores table ``sae_features``: ``release, sae_id, layer, feature, encoder_norm, decoder_norm,
    threshold`` — raw norms, kept for the magnitude analysis. Data version: the content hash of the
    SAE's files, so a new hub revision that leaves this SAE unchanged does not make it stale."""
    release = get_release(ref.release)
    fmt = FORMATS[release.format]
    snapshot = fetch_sae(ref, hub)
    sae = fmt.read(snapshot.path(ref.folder))
    frame = pd.DataFrame(
        {
            "feature": range(sae.d_sae),
            "encoder_norm": sae.encoder_norms.numpy(),
            "decoder_norm": sae.decoder_norms.numpy(),
            "threshold": sae.threshold.numpy(),
        }
    )
    files = [snapshot.path(f"{ref.folder}/{name}") for name in fmt.files]
    out = StageOutput(ref.key, tables={"sae_features": with_sae(frame, ref)}, data_version=fingerprint(files))
    out.facts = {
        "repo": release.sae_repo,
        "revision": snapshot.revision,
        "files": _file_sizes(files, snapshot.root),
        "d_model": sae.d_model,
        "d_sae": sae.d_sae,
        "decoder_norm_mean": float(frame["decoder_norm"].mean()),
    }
    out.add_checks(
        [
            rows_match("one_row_per_feature", frame, sae.d_sae),
            finite("norms_finite", frame, ["encoder_norm", "decoder_norm", "threshold"]),
        ]
    )
    return out


def model_weights(ref: SaeRef, hub: Hub) -> StageOutput:
    """The model the SAE reads: config.json geometry and only the safetensors shards holding the tensors
    the analysis needs (embedding, unembedding, norms, attention projections), each read and checked.

    Partitioned like the SAEs so one SAE's chain is self-contained; the download itself happens once per
    model (hub cache). Data version: the content hash of config, index (sharded models) and the needed shards —
    the files ``fetch_model`` downloaded (a shard holding only MLP weights is not), in the ``shards`` metadata."""
    snapshot, checkpoint = fetch_model(ref.release, hub)
    checkpoint.final_norm_gain()
    checkpoint.unembedding()
    checkpoint.attention(ref.layer)
    listed = [CONFIG_FILE, *([INDEX_FILE] if snapshot.path(INDEX_FILE).exists() else []), *checkpoint.needed_shards()]
    files = [snapshot.path(name) for name in listed]
    facts: dict[str, Fact] = {
        "repo": get_release(ref.release).model_repo,
        "revision": snapshot.revision,
        "geometry": checkpoint.geometry.__dict__,
        "shards": _file_sizes(files, snapshot.root),
    }
    return StageOutput(ref.key, facts=facts, data_version=fingerprint(files))


def _top_tokens_preview(token_rows: pd.DataFrame) -> Markdown:
    """The first 8 features' best tokens, one line each."""
    shown = token_rows[(token_rows["sample"] == "feature") & (token_rows.side == "top") & (token_rows.feature < 8)]
    return Markdown(
        shown.groupby("feature")["token"].apply(lambda t: " · ".join(map(repr, t))).to_frame().to_markdown()
    )


def lens_tables(ref: SaeRef, hub: Hub, n_null: int, settings: EngineSettings, exports: Path) -> StageOutput:
    """Vocabulary lenses (``core.stages.lens_stage``) of every feature, of the control SAE (``core.lens.control``)
    and of random unit directions (the null):

    - output (decoder–unembedding) lens, ``core.lens.output_lens``: final RMSNorm gain folded, Gemma's final
      softcap applied — tables ``output_lens_tokens`` and ``output_lens_stats``;
    - input (encoder–embedding) lens, ``core.lens.circuits.input_lens``: which token embeddings drive the
      feature's encoder — tables ``input_lens_tokens`` and ``input_lens_stats``.

    ``*_tokens``: ``sample`` 'feature' | 'control' | 'null' | 'matched_null', ``feature`` (row index), ``side, rank,
    token_id, token, value`` (top: the ``core.analysis.semantic.CANDIDATES`` best, bottom: top_k). ``*_stats``:
    ``sample``, ``feature``, mean/std/median/p75, softmax max/entropy/top-k mass (over the candidates), ``top_mean``
    (top_k), ``top1_cosine``. ``vocabulary``: ``token_id, token, token_class`` (``core.weights.vocab``) of the model's
    tokenizer. ``neuronpedia_top_logits`` and the Neuronpedia batch JSON: top/bottom logits in SAEDashboard's
    convention (``core.report.neuronpedia``).

    ``n_null`` directions per null; the Neuronpedia batch JSON goes under ``exports``."""
    snapshot, checkpoint, sae = load_sae(ref, hub)
    vocab_size = checkpoint.geometry.vocab_size
    vocabulary = vocabulary_table(snapshot.path(TOKENIZER_FILE), vocab_size)
    # the dashboard first, while no lens rows are held (its engine tiles and theirs never coexist)
    dashboard_vocab = dashboard_tokens(snapshot.path(TOKENIZER_FILE), vocab_size)
    dashboard = with_sae(dashboard_frame(dashboard_top_logits(sae, checkpoint, settings.device), dashboard_vocab), ref)
    start = time.perf_counter()
    tokens = vocabulary["token"].tolist()
    computed = lens_stage(sae, checkpoint, tokens, ref.key, n_null, settings)
    # each frame replaced by its stored form in turn, so the stage's frames are not all kept beside their copies
    lenses = {name: with_sae(computed.pop(name), ref) for name in list(computed)}
    seconds = round(time.perf_counter() - start, 3)
    source = NeuronpediaSource.of(ref, get_release(ref.release))
    export = write_json_export(dashboard, source, exports / "neuronpedia" / ref.release, ref.sae_id)
    out = StageOutput(ref.key, tables={"vocabulary": with_sae(vocabulary, ref), **lenses})
    out.tables["neuronpedia_top_logits"] = dashboard
    out.facts = {
        "lens/seconds": seconds,
        "vocabulary/token_classes": vocabulary["token_class"].value_counts().to_dict(),
        **{
            f"{lens}_lens/top_tokens_preview": _top_tokens_preview(lenses[f"{lens}_lens_tokens"]) for lens in LENS_SIDES
        },
        "neuronpedia_top_logits/json": export,
        "neuronpedia_top_logits/neuronpedia_id": ref.neuronpedia
        or f"none in the registry: SAEDashboard defaults {source}",
        "device": settings.device,
        "dtype": _dtype_name(settings),
    }
    per_direction = min(CANDIDATES, vocab_size) + settings.k  # rows: the candidates on top, k at the bottom
    for lens in LENS_SIDES:
        token_rows, stats = lenses[f"{lens}_lens_tokens"], lenses[f"{lens}_lens_stats"]
        out.checks.setdefault("one_row_per_feature_side_rank", []).append(
            rows_match(lens, token_rows, 2 * (sae.d_sae + n_null) * per_direction)
        )
        out.checks.setdefault("values_finite", []).extend(
            [finite(f"{lens} tokens", token_rows, ["value"]), finite(f"{lens} stats", stats, STAT_COLUMNS)]
        )
        out.checks.setdefault("token_ids_in_vocab", []).append(ids_in_range(lens, token_rows, "token_id", vocab_size))
    out.checks["one_row_per_feature_side_rank"].append(rows_match("neuronpedia", dashboard, sae.d_sae))
    values = dashboard.explode(["pos_values", "neg_values"])
    out.checks["values_finite"].append(finite("neuronpedia", values, ["pos_values", "neg_values"]))
    return out


def circuit_tables(
    ref: SaeRef,
    hub: Hub,
    tables: TableStore,
    n_null: int,
    settings: EngineSettings,
    scope: str,
    circuit_set: str,
    progress: Callable[[int, int], None] | None = None,
) -> StageOutput:
    """Attention circuits (``core.stages.circuit_stage``, ``core.lens.circuits``) of the features, the control
    and random unit directions (the null), at the layers paired with the SAE's hook
    (``scope``): the encoder–embedding writer circuit ``ov_writer`` at layer L,
    the decoder–unembedding QK (feature as query / as key) and OV circuits at reader layer L+1.

    Tables ``circuit_stats``: ``sample, feature, phase, kind, attn_layer, head, kv_head``, pre-softmax
    mean/std/median/p75/top_mean, post-softmax softmax_max/softmax_entropy/topk_mass (softmax over the
    vocabulary), ``top_ids``/``top_values`` (lists, k each); ``head_writes``: ``sample, feature, phase, kind
    ('ov_write_norm'), attn_layer, head, value`` (‖W_O W_V n(d)‖ at the reader layers).

    ``scope``: ``core.lens.circuits.paired_layers``; ``circuit_set``: ``core.lens.circuits.CIRCUIT_SETS``. The
    ``circuit_stats`` rows go to ``tables`` circuit by circuit as they are produced (memory flat in the
    number of circuits)."""
    _, checkpoint, sae = load_sae(ref, hub)
    start = time.perf_counter()
    tally = RowTally(STAT_COLUMNS)
    with tables.appender("circuit_stats", ref.key) as append:
        found = circuit_stage(
            sae,
            checkpoint,
            ref.key,
            ref.layer,
            n_null,
            settings,
            scope,
            circuit_set,
            progress,
            sink=lambda rows: append(tally.add(with_sae(rows, ref))),
        )
    out = StageOutput(
        ref.key, tables={"head_writes": with_sae(found.head_writes, ref)}, streamed={"circuit_stats": tally.rows}
    )
    out.facts = {
        "circuits": found.n_circuits,
        "seconds": round(time.perf_counter() - start, 3),
        "device": settings.device,
        "dtype": _dtype_name(settings),
    }
    expected = (2 * sae.d_sae + n_null) * found.n_circuits
    out.add_checks([tally.rows_match("one_row_per_direction_and_circuit", expected), tally.finite("values_finite")])
    return out


def vocab_matrices(checkpoint: ModelCheckpoint) -> tuple[np.ndarray, np.ndarray]:
    """(W_E, W_U) as float32 arrays, (vocab, d_model): two views of one buffer for a tied model. The embedding
    tensor is held while the unembedding is asked for, so the checkpoint hands back that same tensor instead of
    reading a second copy (an array from ``Tensor.numpy()`` keeps the buffer, not the tensor object)."""
    embedding = checkpoint.embedding()
    return embedding.numpy(), checkpoint.unembedding().numpy()


def feature_classes(ref: SaeRef, hub: Hub, tables: TableStore, k: int, browsers: Path) -> StageOutput:
    """Feature classes of one SAE and of its control (``core.stages.class_stage``: ``core.analysis.classify``,
    ``core.analysis.semantic``, ``core.analysis.profiles``), every threshold calibrated at the null's P99 — the
    SAE-matched null by default (``core.lens.control.matched_null``), the isotropic one for the record; reads the
    stored lens, vocabulary and circuit tables only.

    Tables:
    - ``feature_classes``: ``feature, topk_z, heavy_tailed, {out,in}_{levenshtein, cosine, concentration,
      n_excluded, n_collapsed, n_passes, semantic_score}, semantic_output, semantic_input, semantic,
      semantic_score, output_predicting`` (= heavy-tailed AND semantic output tokens), ``out_top_forms,
      in_top_forms`` (the normal forms tested), ``token_jaccard, top1_share, token_identity``,
      ``out_whitening_components, in_whitening_components`` (principal components the cosine removed), ``threshold,
      null_quantile, null_size, null, rule, k``;
    - ``control_classes``: the same columns for the control SAE (``core.lens.control``), plus its
      ``encoder_norm`` / ``decoder_norm`` (the SAE's norms in a seeded random order);
    - ``semantic_null``: the same columns for both nulls' directions (``sample`` null | matched_null);
    - ``class_thresholds``: ``side, metric, threshold, null_median, quantile, null_size, null`` (matched |
      isotropic | string_permutation: Levenshtein only), ``rule, k``;
    - ``null_quantiles``: ``side, metric, q, value, null`` (the null distributions);
    - ``c1_sensitivity``: ``rule, null, quantile, k, sample, n, hits, fraction``, and the same without
      token-identity features (``core.analysis.classify.c1_sensitivity``);
    - ``attention_participation``: ``sample, feature, phase, attn_layer, head, score`` (mean null-z of the
      phase's circuits), ``topk_mass, threshold, participates`` (features and control; the null's
      false-positive rate in the metadata);
    - ``feature_participation``: ``sample, feature, phase, mean_score, max_score, mean_topk_mass,
      heads_participating, participates``.

    And the feature browser ``<data>/browser/<release>/<sae_id>.html`` (``core.report.feature_browser``, path in the
    ``feature_browser`` metadata; ``browsers``: its folder): every feature's top output and input tokens and
    classes, searchable.

    Of the stored tables it reads only the columns in ``CLASS_READS`` (``core.store.storage.TableStore.read``)."""
    _, checkpoint, sae = load_sae(ref, hub)
    control = control_sae(sae, ref.key, halves=())  # the norms the control's rows carry
    norms = {"encoder_norm": control.encoder_norm.numpy(), "decoder_norm": control.decoder_norm.numpy()}
    width = sae.d_sae
    del sae
    lens = {name: tables.read(name, ref.key, CLASS_READS.get(name)) for name in LENS_TABLES}
    normal = normal_tokens(tables.read("vocabulary", ref.key, CLASS_READS["vocabulary"]))
    stats, writes = (tables.read(name, ref.key, CLASS_READS.get(name)) for name in ("circuit_stats", "head_writes"))
    found = class_stage(lens, stats, writes, normal, *vocab_matrices(checkpoint), DEFAULT_QUANTILE, k)
    classes, part = found.classes, found.participation
    features = found.rows("feature")
    control_rows = found.rows("control").assign(**norms)
    null_rows = classes.rows[classes.rows["sample"].isin(list(NULLS.values()))].reset_index(drop=True)
    features_part = part[part["sample"] != "null"].reset_index(drop=True)
    stored = {
        "feature_classes": features,
        "control_classes": control_rows,
        "semantic_null": null_rows,
        "class_thresholds": classes.thresholds,
        "null_quantiles": classes.null_quantiles,
        "c1_sensitivity": classes.sensitivity,
    }
    out = StageOutput(ref.key, tables={name: with_sae(frame, ref) for name, frame in stored.items()})
    out.tables |= {"attention_participation": features_part, "feature_participation": found.feature_participation}
    browser = write_browser(browsers, ref, lens["output_lens_tokens"], lens["input_lens_tokens"], features)
    hits = int(features.output_predicting.sum())
    low, high = wilson_interval(hits, len(features))
    null_part = part[part["sample"] == "null"].groupby("phase")["participates"].mean()
    out.facts = {
        "feature_browser": browser,  # every feature's tokens, searchable
        "output_predicting_fraction": hits / len(features),
        "control_output_predicting_fraction": float(control_rows.output_predicting.mean()),
        "fraction_ci95": f"[{low:.3f}, {high:.3f}]",
        "semantic_fraction": float(features.semantic.mean()),
        "token_identity_fraction": float(features.token_identity.mean()),
        **{f"null_output_predicting_rate/{name}": classes.null_rate(name) for name in NULLS},
        "whitening_components": classes.whitening_components,
        "null_participation_rate": ", ".join(f"{k}: {v:.4f}" for k, v in null_part.items()),
        "thresholds": Markdown(classes.thresholds.to_markdown(index=False, floatfmt=".4g")),
    }
    n_phases = found.feature_participation["phase"].nunique()
    out.checks = {
        "one_row_per_feature": [
            rows_match("feature_classes", features, width),
            rows_match("control_classes", control_rows, width),
            rows_match("feature_participation", found.feature_participation, 2 * width * n_phases),
        ],
        "scores_finite": [
            finite("feature_classes", features, ["topk_z"]),  # NaN coherence metrics are findings, not defects
            finite("attention_participation", features_part, ["score"]),
        ],
        "thresholds_recorded": [
            rows_match("class_thresholds", classes.thresholds, CALIBRATED * len(NULLS) + len(SIDES)),
            finite("class_thresholds", classes.thresholds, ["threshold"]),
            finite("participation thresholds", features_part, ["threshold"]),
        ],
    }
    return out


AGREEMENT_CHECKS = ("one_row_per_feature", "values_valid", "token_ids_in_vocab")


def agreement_checks(out: dict[str, pd.DataFrame], d_sae: int, vocab_size: int) -> list[Check]:
    """The asset checks of ``core.analysis.agreement.agreement_stage``'s tables (descriptions: ``assets.common``)."""
    summary, agree = out["agreement_summary"], out["activation_agreement"]
    overlaps = agree.drop(columns="feature").to_numpy(dtype=float)
    in_range = bool(
        summary["p_value"].between(0, 1).all() and (np.isnan(overlaps) | ((overlaps >= 0) & (overlaps <= 1))).all()
    )
    statistics = finite("values_valid", summary, ["value", "control"])
    return [
        rows_match("one_row_per_feature", out["activation_features"], d_sae),
        Check(
            "values_valid",
            statistics.passed and in_range,
            f"{statistics.detail}; p-values and overlaps {'in' if in_range else 'outside'} [0, 1]",
        ),
        ids_in_range("token_ids_in_vocab", out["activation_tokens"], "token_id", vocab_size),
    ]


def activation_agreement(ref: SaeRef, hub: Hub, tables: TableStore, k: int, device: str) -> StageOutput:
    """For releases with a corpus (``corpus`` in releases.yaml: the trained releases' held-out text), the model is
    run on it (transformers, ``compute.device``) and each feature's firing, input tokens and removal effect
    (``core.analysis.activations``) are compared with its lenses and classes
    (``core.analysis.agreement.agreement_stage``). Tables ``activation_features``, ``activation_tokens``,
    ``activation_agreement``, ``agreement_summary`` (statistic, value, control = shuffled features / labels, n).
    Releases without a corpus record that only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    corpus = fetch_corpus(ref.release, hub)
    if corpus is None:
        skipped = "the release provides no corpus: nothing measured"
        return StageOutput(
            ref.key,
            facts={"skipped": "the release provides no corpus"},
            checks={n: [Check(n, True, skipped)] for n in AGREEMENT_CHECKS},
        )
    _, checkpoint, sae = load_sae(ref, hub)
    embedding, unembedding = vocab_matrices(checkpoint)
    root = fetch_runnable_model(ref.release, hub).root
    model: Any = AutoModelForCausalLM.from_pretrained(root, dtype=torch.float32, attn_implementation="eager")
    model = model.to(device).eval()
    ids = torch.tensor(AutoTokenizer.from_pretrained(root)(corpus.read_text(), add_special_tokens=False)["input_ids"])
    chunks = ids[: len(ids) // CORPUS_CONTEXT * CORPUS_CONTEXT].view(-1, CORPUS_CONTEXT).to(device)
    lens = {side: tables.read(f"{side}_lens_tokens", ref.key) for side in ("output", "input")}
    moved = {f: getattr(sae, f).to(device) for f in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")}
    classes, participation = tables.read("feature_classes", ref.key), tables.read("feature_participation", ref.key)
    found = agreement_stage(
        model,
        replace(sae, **moved),
        ref.layer,
        chunks,
        lens,
        classes,
        participation,
        tables.read("vocabulary", ref.key),
        {"output": unembedding, "input": embedding},
        k=k,
        seed=zlib.crc32(ref.key.encode()),
    )
    out = StageOutput(ref.key, tables={name: with_sae(frame, ref) for name, frame in found.items()})
    out.facts = {
        "agreement": Markdown(found["agreement_summary"].to_markdown(index=False, floatfmt=".3f")),
        "corpus_tokens": int(chunks.numel()),
    }
    out.add_checks(agreement_checks(found, sae.d_sae, model.config.vocab_size))
    return out


def claim_statistics(frames: dict[str, pd.DataFrame], registered: list[str], hub: Hub) -> list[StageOutput]:
    """Per release with stored feature classes: every measured quantity of claims C1–C4 for the features
    and their control (``core.analysis.claims.release_results``), stored as tables (the plot and report assets read
    them back, ``stored_results``): ``claim_verdicts`` (``core.analysis.verdicts``: ``release, claim, verdict,
    statistic, value, ci_low, ci_high, control_value, p_value, n, rule``), ``output_fraction_by_layer`` (``sample,
    layer, sae_id, n, hits, fraction, ci_low, ci_high``) and ``depth_profiles`` (``sample, phase, layer, depth, n,
    participating, mean/median/p75`` with 95 % bands) and, where ``activation_agreement`` ran (releases with a
    corpus), ``release_agreement`` (``core.analysis.agreement.release_agreement``). Planted releases carry their ground
    truth.

    ``frames``: the stored ``STATISTICS_INPUTS`` of every release; ``registered``: the partition keys
    ``release:sae_id`` the orchestrator knows (``sae_coverage`` lists which were analysed)."""
    if frames["feature_classes"].empty:
        raise ValueError("No feature_classes rows are stored yet: materialise at least one SAE partition first.")
    outputs = []
    for release_id in sorted(frames["feature_classes"]["release"].unique()):
        release = get_release(str(release_id))
        truth = load_truth(release.id, hub).data if release.planted else None
        saes = [key.partition(":")[2] for key in registered if key.startswith(f"{release.id}:")]
        architecture = model_geometry(release.id, hub).architecture
        result = results_from_tables(release, architecture, frames, truth, registered=saes)
        tables = {
            "sae_coverage": result.coverage,
            "claim_verdicts": result.verdicts,
            "output_fraction_by_layer": result.by_layer,
            "depth_profiles": result.profile,
            "release_agreement": result.agreement,
        }
        out = StageOutput(release.id, {n: f for n, f in tables.items() if len(f)}, label_prefix=f"{release.id}/")
        not_analysed = missing_saes(result.coverage)
        out.facts = {
            "verdicts": Markdown(verdict_table(result.verdicts)),
            "missing_layers": str(result.missing_layers),
            "missing_saes": not_analysed,
        }
        if result.missing_layers:
            out.warnings.append(f"{release.id}: no analysed SAE for layers {result.missing_layers}")
        if not_analysed:
            out.warnings.append(f"{release.id}: registered SAEs not analysed (statistics without them): {not_analysed}")
        analysed = frames["feature_classes"].query("release == @release.id")["sae_id"].nunique()
        verdicts = ", ".join(f"{c}: {v}" for c, v in zip(result.verdicts["claim"], result.verdicts["verdict"]))
        out.checks = {
            "one_row_per_analysed_sae": [
                rows_match(f"{release.id} by layer (features, control)", result.by_layer, 2 * analysed)
            ],
            "statistics_finite": [finite(f"{release.id} by layer", result.by_layer, ["fraction", "ci_low", "ci_high"])],
            "verdicts_valid": [
                Check(f"{release.id} verdicts", bool(result.verdicts["verdict"].isin(VERDICTS).all()), verdicts)
            ],
        }
        if len(result.profile):
            out.checks["statistics_finite"].append(
                finite(f"{release.id} profiles", result.profile, list(PROFILE_STATS))
            )
        outputs.append(out)
    return outputs
