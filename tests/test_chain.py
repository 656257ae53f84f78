"""The whole asset chain on the planted releases, on a real (ephemeral) Dagster instance, offline.

Weights → output lens → feature classes → report, read back from DuckDB; then bad inputs through the
same chain: each a clear error naming the file, and the rows stored before are still there.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from assets.plots import asset_name
from core.analysis.semantic import CANDIDATES
from core.registry import get_release, parse_key
from core.report.plots import PLOT_FILES
from core.weights.hub_cache import write_snapshot
from orchestration.definitions import SAE_ASSETS, defs
from tests.planted_chain import PLANTED, chain_resources
from tests.test_versions import ASSETS

pytestmark = pytest.mark.chain


def truth(cache: Path, release_id: str) -> dict:
    repo = get_release(release_id).sae_repo.replace("/", "--")
    (path,) = (cache / f"models--{repo}" / "snapshots").glob("*/planted_truth.json")
    return json.loads(path.read_text())


def test_definitions_load():
    assert {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()} >= ASSETS
    assert set(map(asset_name, PLOT_FILES)) <= ASSETS  # every plot of the registry is an asset


def test_every_sae_partition_is_registered_and_materialised(chain):
    instance, _, keys = chain
    registered = instance.get_dynamic_partitions("sae")
    assert len(registered) == 6 + 8 and set(keys) < set(registered) and len(keys) == 6 + 7  # llama: one layer left out
    for asset in ("sae_weights", "lens_tables", "feature_classes"):
        done = instance.get_materialized_partitions(dg.AssetKey(asset))
        assert done == set(keys), asset
    record = instance.get_latest_materialization_event(dg.AssetKey("sae_weights"))
    assert record.asset_materialization.metadata["revision"].value  # the hub revision sha is recorded


def analysed_saes(t: dict, data: Path, release_id: str) -> dict:
    """The planted truth of the SAEs the chain analysed."""
    with duckdb.connect(str(data / "results.duckdb"), read_only=True) as con:
        done = {
            r[0]
            for r in con.execute("SELECT DISTINCT sae_id FROM sae_features WHERE release = ?", [release_id]).fetchall()
        }
    assert len(done) == get_release(release_id).n_layers - (release_id == "planted-llama")  # llama: one left out
    return {sae_id: sae for sae_id, sae in t["saes"].items() if sae_id in done}


def test_every_table_check_ran_and_passed(chain):
    """The integrity checks each asset reports with its tables (visible in the UI) all passed."""
    instance, _, keys = chain
    evaluations = [
        e.dagster_event.event_specific_data
        for run in instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.SUCCESS]))
        for e in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    ]
    by_check: dict[tuple[str, str], list[bool]] = {}
    for ev in evaluations:
        by_check.setdefault((ev.asset_key.to_user_string(), ev.check_name), []).append(ev.passed)
    per_sae = ("sae_weights", "lens_tables", "circuit_tables", "feature_classes")
    expected = {
        (spec.asset_key.to_user_string(), spec.name)
        for asset in (*per_sae, "claim_statistics")
        for spec in defs.resolve_assets_def(asset).check_specs
    }
    assert (
        expected <= set(by_check)
        and {("feature_classes", "thresholds_recorded"), ("claim_statistics", "one_row_per_analysed_sae")} <= expected
    )
    for check in expected:
        runs = len(keys) if check[0] in per_sae else 1  # one evaluation per partition, or per release-level run
        assert len(by_check[check]) >= runs and all(by_check[check]), check


def test_tables_are_queryable_from_duckdb(chain):
    _, data, keys = chain
    with duckdb.connect(str(data / "results.duckdb"), read_only=True) as con:
        tables = {row[0] for row in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        assert {
            "sae_features",
            "output_lens_tokens",
            "output_lens_stats",
            "feature_classes",
            "control_classes",
            "output_fraction_by_layer",
            "claim_verdicts",
            "head_writes",
        } <= tables
        verdicts = con.execute("SELECT release, claim, verdict, rule FROM claim_verdicts").df()
        assert set(verdicts["release"]) == set(PLANTED) and verdicts["rule"].str.len().gt(0).all()
        assert set(verdicts["verdict"]) <= {"consistent", "not reproduced", "inconclusive", "not measured"}
        assert {"C1", "C2 encoder_embedding", "C2 decoder_unembedding", "C4"} <= set(verdicts["claim"])
        per_sae = dict(
            con.execute("SELECT release || ':' || sae_id, count(*) FROM sae_features GROUP BY ALL").fetchall()
        )
        assert set(per_sae) == set(keys)
        assert per_sae["planted-gemma:layer_0/width_512/average_l0_32"] == 512
        assert per_sae["planted-llama:l0r_8x"] == 1024
        tokens = con.execute(
            "SELECT count(*) FROM output_lens_tokens "
            "WHERE release = 'planted-llama' AND layer = 5 AND sample = 'feature'"
        ).fetchone()[0]
        assert tokens == 1024 * (CANDIDATES + 10)  # the top candidates and the bottom 10 per feature
        classes = dict(
            con.execute(
                "SELECT token_class, count(*) FROM vocabulary WHERE release = 'planted-llama' "
                "AND layer = 5 GROUP BY ALL"
            ).fetchall()
        )
        assert classes["special"] == 1 and classes["byte"] > 0 and classes["normal"] > 10_000
        nulls = con.execute(
            "SELECT count(*) FROM output_lens_stats WHERE sample = 'null' AND layer = 0 AND release = 'planted-gemma'"
        ).fetchone()[0]
        assert nulls == 512  # ComputeResource.null_directions
        dashboard = con.execute(
            "SELECT count(*), min(len(pos_str)), max(len(neg_values)) FROM neuronpedia_top_logits "
            "WHERE release = 'planted-llama' AND layer = 5"
        ).fetchone()
        assert dashboard == (1024, 10, 10)  # top/bottom 10 logits per feature, SAEDashboard's convention
    exports = sorted(p.name for p in (data / "exports" / "neuronpedia" / "planted-llama").glob("*.json"))
    assert exports == sorted(f"{parse_key(k).sae_id}.json" for k in keys if k.startswith("planted-llama:"))


@pytest.mark.parametrize("release_id", PLANTED)
def test_planted_output_tokens_are_recovered(chain, planted_cache, release_id):
    """Each planted semantic feature's top output tokens are its planted token group."""
    _, data, _ = chain
    t = truth(planted_cache, release_id)
    groups = {g["id"]: set(g["token_ids"]) for g in t["token_groups"]}
    with duckdb.connect(str(data / "results.duckdb"), read_only=True) as con:
        top = con.execute(
            "SELECT sae_id, feature, list(token_id ORDER BY rank) FROM output_lens_tokens "
            "WHERE release = ? AND sample = 'feature' AND side = 'top' AND rank <= 5 GROUP BY ALL",
            [release_id],
        ).fetchall()
    top = {(sae_id, feature): ids for sae_id, feature, ids in top}
    checked = 0
    for sae_id, sae in analysed_saes(t, data, release_id).items():
        for f in sae["semantic_features"]:
            assert set(top[(sae_id, f["index"])]) <= groups[f["output_group"]], (sae_id, f["index"])
            checked += 1
    assert checked == round(t["semantic_fraction"] * len(top))


@pytest.mark.parametrize("release_id", PLANTED)
def test_output_predicting_fraction_matches_planted_truth(chain, planted_cache, release_id):
    _, data, _ = chain
    t = truth(planted_cache, release_id)
    with duckdb.connect(str(data / "results.duckdb"), read_only=True) as con:
        calls = con.execute(
            "SELECT sae_id, feature, output_predicting FROM feature_classes WHERE release = ?", [release_id]
        ).df()
    planted = {
        (s, f["index"]) for s, sae in analysed_saes(t, data, release_id).items() for f in sae["semantic_features"]
    }
    called = {(s, f) for s, f, hit in calls.itertuples(index=False) if hit}
    assert planted <= called  # every planted feature found
    false_positive_rate = len(called - planted) / (len(calls) - len(planted))
    assert false_positive_rate < 0.03  # the null is calibrated at P99: about 1 % expected
    assert abs(len(called) / len(calls) - t["semantic_fraction"]) < 0.02


def test_report_and_plot_written(chain):
    _, data, keys = chain
    for release_id in PLANTED:
        report = (data / "reports" / release_id / "report.md").read_text()
        assert "## Verdicts" in report and "| C1 |" in report and "Planted ground truth" in report
        assert "control" in report  # features and control side by side
        missing = sorted(
            set(range(get_release(release_id).n_layers))
            - {parse_key(k).layer for k in keys if k.startswith(release_id)}
        )
        assert not missing or f"Layers without an analysed SAE: {', '.join(map(str, missing))}" in report  # gap named
        for file_name in PLOT_FILES.values():  # one asset per plot, each file linked from the report
            png = (data / "reports" / release_id / file_name).read_bytes()
            assert png.startswith(b"\x89PNG") and len(png) > 10_000, file_name
            assert f"]({file_name})" in report


def failure_text(result: dg.ExecuteInProcessResult) -> str:
    """The messages of a failed step's error and its causes (what the UI shows)."""
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    error, parts = failure.step_failure_data.error, []
    while error is not None:
        parts.append(error.message)
        error = error.cause
    return "\n".join(parts)


def copy_cache(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def test_corrupt_sae_revision_fails_clearly_and_keeps_stored_rows(chain, planted_cache, tmp_path):
    """A new hub revision with a truncated params.npz: the run fails naming the file; the rows of the
    previous materialisation of that partition are untouched."""
    instance, data, _ = chain
    cache = copy_cache(planted_cache, tmp_path / "cache")
    key = "planted-gemma:layer_3/width_512/average_l0_32"  # analysed: its stored rows must survive
    ref = parse_key(key)
    repo = get_release("planted-gemma").sae_repo
    npz = next((cache / f"models--{repo.replace('/', '--')}" / "snapshots").glob(f"*/{ref.folder}/params.npz"))
    write_snapshot(cache, repo, {f"{ref.folder}/params.npz": npz.read_bytes()[:1000]})
    before = (data / "tables" / "sae_features").glob("*")
    before = {p.name: p.read_bytes() for p in before}
    result = dg.materialize(
        SAE_ASSETS, partition_key=key, instance=instance, resources=chain_resources(cache, data), raise_on_error=False
    )
    assert not result.success
    assert f"{ref.folder}/params.npz: unreadable npz" in failure_text(result)
    assert {p.name: p.read_bytes() for p in (data / "tables" / "sae_features").glob("*")} == before


def test_offline_empty_cache_and_missing_layer_are_clear_errors(chain, tmp_path):
    instance, data, _ = chain
    result = dg.materialize(
        SAE_ASSETS[:1],
        partition_key="planted-llama:l3r_8x",
        instance=instance,
        resources=chain_resources(tmp_path / "empty-cache", data),
        raise_on_error=False,
    )
    text = failure_text(result)
    assert "planted/Llama-Scope-tiny-LXR-8x" in text and "is not in" in text and "HF_HUB_OFFLINE" in text
    with pytest.raises(Exception, match="layer 9 is outside release 'planted-llama'"):
        parse_key("planted-llama:l9r_8x")


def readme_queries() -> list[str]:
    """The SQL statements of the README's ```sql blocks."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    blocks = [b.split("```", 1)[0] for b in text.split("```sql")[1:]]
    statements = [q.strip() for b in blocks for q in b.split(";")]
    return [q for q in statements if any(line.strip() and not line.strip().startswith("--") for line in q.splitlines())]


def test_readme_queries_run_and_return_rows(chain):
    _, data, _ = chain
    queries = readme_queries()
    assert len(queries) >= 6
    with duckdb.connect(str(data / "results.duckdb"), read_only=True) as con:
        for query in queries:
            assert len(con.execute(query).fetchall()) > 0, query


def test_no_value_goes_through_an_io_manager(chain):
    """The plots and the report read what claim_statistics stored: no step loads an input from an IO manager
    (before, every plot loaded claim_statistics' pickle from $DAGSTER_HOME/storage)."""
    instance, _, _ = chain
    loaded = [
        e.dagster_event.message
        for run in instance.get_runs()
        for e in instance.all_logs(run.run_id)
        if e.dagster_event is not None and e.dagster_event.event_type == dg.DagsterEventType.LOADED_INPUT
    ]
    assert loaded == []
