"""``weightlens materialize`` (orchestration/cli.py): it recomputes only what is stale or missing, selects SAEs the
SAELens way, takes compute settings, and reports expected errors in one line.

Each test that runs the CLI has its own DAGSTER_HOME (a temporary directory with the project's dagster.yaml) and
data directory; the hub cache holds planted-gemma with two layers only (or a fake listing of a real release), read
offline.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

import dagster as dg
import pytest

from core.testbeds.planted import generate
from core.weights.hub_cache import write_snapshot
from orchestration import cli
from orchestration.definitions import REPORT_ASSETS, SAE_ASSETS
from tests.fake_hub import FakeHub

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[1]
RELEASE = "planted-gemma"
LAYER_0, LAYER_1 = (f"{RELEASE}:layer_{n}/width_512/average_l0_32" for n in (0, 1))
CHAIN = {key.to_user_string() for asset in SAE_ASSETS for key in asset.keys}
REPORT = {key.to_user_string() for asset in REPORT_ASSETS for key in asset.keys}
REAL = "gemma-scope-2b-pt-res"
# A listing of the real release (files are placeholders: dry runs only list them). Canonical L0s (releases.yaml):
# 16k layer 0 = 105, layer 1 = 102; 65k layer 0 = 73; 1m layer 12 = 107.
REAL_SAES = [
    "layer_0/width_16k/average_l0_105",
    "layer_0/width_16k/average_l0_13",
    "layer_0/width_65k/average_l0_73",
    "layer_0/width_65k/average_l0_11",
    "layer_1/width_16k/average_l0_102",
    "layer_1/width_16k/average_l0_9",
    "layer_12/width_1m/average_l0_107",
    "layer_12/width_1m/average_l0_22",
]


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """planted-gemma's model and its layer 0 and 1 SAEs in a hub cache."""
    cache = tmp_path_factory.mktemp("hf-cache")
    generate(RELEASE, cache, layers=[0, 1])
    return cache


@dataclass(frozen=True)
class Env:
    home: Path
    settings: Path  # -c file: data dir under tmp_path, test-sized null samples

    def main(self, *args: str) -> None:
        cli.main(["materialize", *args, "-c", str(self.settings)])

    def materialisations(self) -> set[tuple[str, str | None, int]]:
        """(asset, partition, storage id) of every materialisation in the instance."""
        with dg.DagsterInstance.get() as instance:
            return {
                (key.to_user_string(), r.partition_key, r.storage_id)
                for key in (dg.AssetKey(name) for name in CHAIN | REPORT)
                for r in instance.fetch_materializations(dg.AssetRecordsFilter(key), limit=10_000).records
            }

    def partitions(self) -> list[str]:
        with dg.DagsterInstance.get() as instance:
            return instance.get_dynamic_partitions("sae")


def make_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path) -> Env:
    home = tmp_path / "dagster-home"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    settings = tmp_path / "settings.yaml"
    settings.write_text(
        f"resources:\n  store:\n    config:\n      data_dir: {tmp_path / 'data'}\n"
        "  compute:\n    config:\n      device: cpu\n      null_directions: 64\n"
        "      circuit_null_directions: 32\n"
    )
    for name in ("HF_HOME", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return Env(home, settings)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_cache: Path) -> Env:
    return make_env(tmp_path, monkeypatch, small_cache)


def out_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().out.splitlines()


def planned(lines: list[str]) -> set[str]:
    """Partition keys a dry run says it would run."""
    return {
        line.removeprefix("would run ").split(": ")[0]
        for line in lines
        if line.startswith("would run ") and not line.startswith("would run report")
    }


def test_second_run_recomputes_nothing_force_and_changes_do(
    env: Env, small_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env.main(RELEASE)
    assert "plan: 2 partition(s) to recompute (" in capsys.readouterr().out  # nothing timed yet: counted only
    first = env.materialisations()
    everything = {(a, k) for a in CHAIN for k in (LAYER_0, LAYER_1)} | {(a, None) for a in REPORT}
    assert {(a, p) for a, p, _ in first} == everything
    capsys.readouterr()

    start = time.perf_counter()
    env.main(RELEASE)
    seconds = time.perf_counter() - start
    lines = out_lines(capsys)
    assert env.materialisations() == first, "a second run must not materialise anything"
    assert seconds < 10, f"second run took {seconds:.1f} s"
    skips = [line for line in lines if line.startswith("skip ")]
    assert "nothing to recompute" in lines
    assert skips == [
        f"skip {key}: current (code versions, input data versions and settings unchanged)" for key in (LAYER_0, LAYER_1)
    ] + [skips[-1]] and skips[-1].startswith("skip report: current")

    # Other compute settings make the assets that use them stale (the weights do not use them); --dry-run says so
    # and runs nothing.
    env.main(RELEASE, "--dtype", "bfloat16", "--circuit-layers", "all", "--dry-run")
    lines = out_lines(capsys)
    assert env.materialisations() == first
    (line,) = [line for line in lines if line.startswith(f"would run {LAYER_0}")]
    assert "dtype 'float32' -> 'bfloat16'" in line and "circuit_layers 'adjacent' -> 'all'" in line
    assert line.endswith("-> lens_tables, circuit_tables, feature_classes")
    # before anything runs, how many partitions and roughly how long (from the first run's step durations)
    (plan,) = [line for line in lines if line.startswith("plan: ")]
    assert plan.startswith(
        "plan: 2 partition(s) to recompute (lens_tables on 2, circuit_tables on 2, feature_classes on 2), roughly "
    ) and plan.endswith(" from earlier runs"), plan
    assert any(line.startswith("would run report: 2 SAE partition(s) recomputed") for line in lines)

    # --force recomputes the selected partition (its whole chain) and the report, nothing else.
    env.main(RELEASE, "--force", "--layers", "1")
    forced = env.materialisations() - first
    assert {(a, p) for a, p, _ in forced} == {(a, LAYER_1) for a in CHAIN} | {(a, None) for a in REPORT}
    capsys.readouterr()

    # A changed SAE file (a new revision of the SAE repository) makes that SAE's chain stale, not its model's.
    changed = tmp_path / "changed-cache"
    shutil.copytree(small_cache, changed, symlinks=True)
    write_snapshot(
        changed, "planted/gemma-scope-tiny-pt-res", {"layer_0/width_512/average_l0_32/params.npz": b"other bytes"}
    )
    monkeypatch.setenv("HF_HUB_CACHE", str(changed))
    env.main(RELEASE, "--dry-run")
    lines = out_lines(capsys)
    (line,) = [line for line in lines if line.startswith(f"would run {LAYER_0}")]
    assert "SAE files changed (planted/gemma-scope-tiny-pt-res@" in line
    assert line.endswith("-> sae_weights, lens_tables, circuit_tables, feature_classes")
    assert f"skip {LAYER_1}: current (code versions, input data versions and settings unchanged)" in lines
    assert env.materialisations() == first | forced


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--sae", "layer_1/width_512/canonical"], {LAYER_1}),  # a canonical alias id, resolved to its L0 folder
        (["--sae", LAYER_0], {LAYER_0}),
        (["--layers", "0"], {LAYER_0}),
        (["--layers", "0-1", "--width", "512"], {LAYER_0, LAYER_1}),
        (["--canonical", "--layers", "1,3"], {LAYER_1}),
    ],
)
def test_planted_selection(env: Env, args: list[str], expected: set[str], capsys: pytest.CaptureFixture[str]) -> None:
    env.main(RELEASE, *args, "--dry-run")
    assert planned(out_lines(capsys)) == expected
    assert env.materialisations() == set() and env.partitions() == [], "a dry run registers and runs nothing"


@pytest.fixture
def real_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    """A hub cache listing some SAEs of the real gemma-scope-2b-pt-res (no model: a dry run needs none)."""
    cache = tmp_path / "real-cache"
    write_snapshot(cache, "google/gemma-scope-2b-pt-res", {f"{sae}/params.npz": sae.encode() for sae in REAL_SAES})
    return make_env(tmp_path, monkeypatch, cache)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            [REAL, "--canonical"],
            [
                "layer_0/width_16k/average_l0_105",
                "layer_0/width_65k/average_l0_73",
                "layer_1/width_16k/average_l0_102",
                "layer_12/width_1m/average_l0_107",
            ],
        ),
        (
            [f"{REAL}-canonical", "--width", "16k"],
            ["layer_0/width_16k/average_l0_105", "layer_1/width_16k/average_l0_102"],
        ),
        (
            [REAL, "--layers", "0", "--width", "65k"],
            ["layer_0/width_65k/average_l0_73", "layer_0/width_65k/average_l0_11"],
        ),
        (
            [REAL, "--width", "16k", "--width", "1m", "--layers", "1-12"],
            [
                "layer_1/width_16k/average_l0_102",
                "layer_1/width_16k/average_l0_9",
                "layer_12/width_1m/average_l0_107",
                "layer_12/width_1m/average_l0_22",
            ],
        ),
        (
            [REAL, "--sae", "layer_12/width_1m/canonical", "--sae", "layer_0/width_16k/average_l0_13"],
            ["layer_12/width_1m/average_l0_107", "layer_0/width_16k/average_l0_13"],
        ),
        (["--sae", f"{REAL}:layer_1/width_16k/average_l0_9"], ["layer_1/width_16k/average_l0_9"]),  # names its release
    ],
)
def test_real_release_selection(
    real_env: Env, args: list[str], expected: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    real_env.main(*args, "--dry-run")
    lines = out_lines(capsys)
    assert planned(lines) == {f"{REAL}:{sae}" for sae in expected}
    chain = ", ".join(key.to_user_string() for asset in SAE_ASSETS for key in asset.keys)
    runs = [line for line in lines if line.startswith("would run ")]
    assert runs[-1] == f"would run report: {len(expected)} SAE partition(s) recomputed -> every report asset"
    assert all(line.endswith(f": never materialised: {chain} -> {chain}") for line in runs[:-1])
    assert real_env.materialisations() == set() and real_env.partitions() == []


def error_line(capsys: pytest.CaptureFixture[str], cache: Path, *args: str) -> str:
    """The one stderr line of an expected error (exit status 2, no traceback), which names the hub cache."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["materialize", *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert line.startswith("weightlens: error: ") and line.endswith(f"[hub cache: {cache}]")
    return line


def test_offline_with_an_empty_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty-cache"
    make_env(tmp_path, monkeypatch, empty)
    assert "planted/gemma-scope-tiny-pt-res (revision main) is not in " in error_line(capsys, empty, RELEASE)
    monkeypatch.delenv("HF_HUB_CACHE")  # huggingface_hub's fallback: $HF_HOME/hub
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    assert f"is not in {tmp_path / 'hf-home' / 'hub'} " in error_line(capsys, tmp_path / "hf-home" / "hub", RELEASE)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["planted-gemmma"], "Unknown SAE release 'planted-gemmma'. Did you mean planted-gemma"),
        ([RELEASE, "--sae", "layer_1/width_16k"], "SAE id 'layer_1/width_16k' does not match release 'planted-gemma'"),
        (
            [RELEASE, "--sae", "layer_3/width_512/average_l0_32"],
            f"SAE {RELEASE}:layer_3/width_512/average_l0_32 is not in planted/gemma-scope-tiny-pt-res@",
        ),
        ([RELEASE, "--layers", "7"], "no listed SAE matches the selection (planted-gemma: layers [0, 1]"),
        (["planted-llama", "--canonical"], "--canonical: release planted-llama has no canonical table"),
        ([RELEASE, "--dtype", "float16"], "invalid settings: compute dtype 'float16' is not one of"),
        ([RELEASE, "-c", "missing.yaml"], "settings file not found: missing.yaml"),
    ],
)
def test_expected_errors(
    env: Env, small_cache: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in error_line(capsys, small_cache, *args)
    assert env.materialisations() == set()


def test_a_bad_settings_file_names_the_field(
    env: Env, small_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("resources:\n  compute:\n    config:\n      nul_directions: 8\n")
    line = error_line(capsys, small_cache, RELEASE, "-c", str(bad))
    assert "settings: resources.compute takes `config:` with fields device, dtype" in line


def test_gated_repository_without_a_token(tmp_path: Path) -> None:
    """Online (a fake hub): the release lists publicly, its files need a token; the run's failure is one line."""
    source = tmp_path / "hub"
    write_snapshot(source, "google/gemma-scope-2b-pt-res", {f"{REAL_SAES[0]}/params.npz": b"placeholder"})
    write_snapshot(source, "google/gemma-2-2b", {"config.json": b"{}"})
    home, cache = tmp_path / "dagster-home", tmp_path / "client-cache"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    with FakeHub(source, gated={"google/gemma-scope-2b-pt-res", "google/gemma-2-2b"}) as hub:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
        env.update(
            HF_ENDPOINT=hub.url,
            HF_HUB_CACHE=str(cache),
            HF_HOME=str(tmp_path / "hf-home"),
            HF_HUB_DISABLE_TELEMETRY="1",
            DAGSTER_HOME=str(home),
            WEIGHTLENS_DATA_DIR=str(tmp_path / "data"),
        )
        proc = subprocess.run(
            [sys.executable, "-m", "orchestration.cli", "materialize", REAL, "--sae", "layer_0/width_16k/canonical"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert f"{REAL}:{REAL_SAES[0]}: google/" in line and " is gated: " in line
    assert line.endswith(f"[hub cache: {cache}]")


def test_settings_of_runs_without_the_tag_are_the_defaults_under_their_run_config() -> None:
    """Runs from the UI or the sensor carry no settings tag: their run config (launchpad) over the defaults."""
    run = dg.DagsterRun(job_name="sae_chain", run_config={"resources": {"compute": {"config": {"dtype": "bfloat16"}}}})
    settings = cli.recorded_settings(run)
    assert settings["compute"]["dtype"] == "bfloat16" and settings["compute"]["null_directions"] == 1024
    tagged = dg.DagsterRun(job_name="sae_chain", tags={cli.SETTINGS_TAG: '{"compute": {"dtype": "float32"}}'})
    assert cli.recorded_settings(tagged) == {"compute": {"dtype": "float32"}}


def test_console_script() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["weightlens"].partition(":")
    assert getattr(import_module(module), name) is cli.main
