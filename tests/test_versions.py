"""Code versions (``orchestration.versions``) change for exactly the assets whose computation an edit reaches.

One subprocess on a temporary copy of the repository (the copy first on ``sys.path``) imports
``orchestration.jobs`` once, reads every asset's code version from its spec, then for each edit below changes
the copy's file, recomputes the versions from the edited sources (``orchestration.versions`` reloaded: fresh
caches), and restores the file. Every edit is to ``core`` or ``orchestration/resources.py``, never to the
modules defining the compute functions, so the imported functions still match their files.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.chain

ROOT = Path(__file__).resolve().parents[1]
PLOTS = {
    "plot_output_fraction",
    "plot_depth_profiles",
    "plot_participation_heatmap",
    "plot_semantic_violins",
    "plot_calibration",
    "plot_c1_sensitivity",
}
ASSETS = {
    "sae_weights",
    "model_weights",
    "lens_tables",
    "circuit_tables",
    "feature_classes",
    "claim_statistics",
    *PLOTS,
    "claims_report",
}
KERNEL_FUNCTION = '\nextern "C" int weightlens_unused_probe() { return 0; }\n'

# name -> (file, text to replace (None: append), replacement, the assets whose code version must change).
# claims_report reads only ``core.report.plots.PLOT_FILES`` (file names), so a plot edit reaches its plot asset alone.
EDITS: dict[str, tuple[str, str | None, str, set[str]]] = {
    "classify module docstring": (
        "core/analysis/classify.py",
        "1. Heavy-tailed output lens.",
        "1. Heavy-tailed lens.",
        set(),
    ),
    "classify function docstring": ("core/analysis/classify.py", '"""Per k: ``(mean', '"""For each k: ``(mean', set()),
    "hub error message": (
        "core/weights/hub.py",
        "revision {revision!r} not found on the hub",
        "revision {revision!r} does not exist",
        set(),
    ),
    "c1 sensitivity plot title": (
        "core/report/plots.py",
        "C1 sensitivity to the threshold quantile",
        "C1 against the threshold quantile",
        {"plot_c1_sensitivity"},
    ),
    "output fraction plot title": (
        "core/report/plots.py",
        "features whose decoder direction directly predicts",
        "features whose decoder predicts",
        {"plot_output_fraction"},
    ),
    "token identity threshold": (
        "core/analysis/classify.py",
        "TOKEN_IDENTITY_JACCARD = 0.5",
        "TOKEN_IDENTITY_JACCARD = 0.6",
        {"feature_classes"},
    ),
    "top-k z formula": (
        "core/analysis/classify.py",
        "out[k] = (top_mean - mean) / std",
        "out[k] = (top_mean - mean) / (std + 1e-9)",
        {"feature_classes"},
    ),
    "native kernel": ("core/compute/rowstats.cpp", None, KERNEL_FUNCTION, {"lens_tables", "circuit_tables"}),
    "top_k default": (
        "orchestration/resources.py",
        "top_k: int = 10",
        "top_k: int = 12",
        {"lens_tables", "circuit_tables", "feature_classes"},
    ),
    "null_directions default": (
        "orchestration/resources.py",
        "null_directions: int = 1024",
        "null_directions: int = 512",
        {"lens_tables"},
    ),
    "circuit_layers default": (
        "orchestration/resources.py",
        'circuit_layers: str = "adjacent"',
        'circuit_layers: str = "all"',
        {"circuit_tables"},
    ),
    "device default (neutral)": (
        "orchestration/resources.py",
        "device: str | None = None",
        'device: str | None = "cpu"',
        set(),
    ),
}
# the ComputeResource fields hashed into each asset's code version (every other asset: none)
SETTINGS = {
    "lens_tables": ["dtype", "null_directions", "top_k"],
    "circuit_tables": ["circuit_layers", "circuit_null_directions", "circuit_set", "dtype", "top_k"],
    "feature_classes": ["top_k"],
}

DRIVER = """
import importlib, json, linecache, sys
from pathlib import Path
import orchestration.jobs as jobs
import orchestration.versions
from orchestration.resources import ComputeResource

assets = {a.key.to_user_string(): a for a in jobs.SAE_ASSETS + jobs.REPORT_ASSETS}
fns = {name: a.op.compute_fn.decorated_fn for name, a in assets.items()}

def versions():
    linecache.clearcache()
    fresh = importlib.reload(orchestration.versions)
    return {name: fresh.code_version(fn) for name, fn in fns.items()}

deps = {name: orchestration.versions.dependencies(fn) for name, fn in fns.items()}
prefix = "orchestration.resources:ComputeResource."
out = {
    "module": orchestration.versions.__file__,
    "specs": {name: a.specs_by_key[a.key].code_version for name, a in assets.items()},
    "baseline": versions(),
    "settings": {name: [k.removeprefix(prefix) for k in d if k.removeprefix(prefix) in ComputeResource.model_fields]
                 for name, d in deps.items()},
    "edited": {},
}
for name, (file, old, new) in json.loads(sys.argv[1]).items():
    path = Path(file)
    text = path.read_text()
    assert old is None or text.count(old) == 1, (name, old)
    path.write_text(text + new if old is None else text.replace(old, new))
    try:
        out["edited"][name] = versions()
    finally:
        path.write_text(text)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The driver's output on a fresh copy of ``core``, ``assets`` and ``orchestration``."""
    copy = tmp_path_factory.mktemp("repo")
    for package in ("core", "assets", "orchestration"):
        shutil.copytree(ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    edits = {name: (file, old, new) for name, (file, old, new, _) in EDITS.items()}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(copy), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", DRIVER, json.dumps(edits)],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(out["module"]).resolve().is_relative_to(copy.resolve()), "the copy was not imported first"
    print(f"\n{'edit':<30}" + "".join(f"{a.removeprefix('plot_')[:9]:>10}" for a in out["baseline"]))
    print(f"{'(baseline)':<30}" + "".join(f"{v[:8]:>10}" for v in out["baseline"].values()))
    for name, found in out["edited"].items():
        print(
            f"{name[:29]:<30}"
            + "".join(f"{'changed' if found[a] != v else '.':>10}" for a, v in out["baseline"].items())
        )
    return out


def test_every_asset_is_versioned_and_deterministic(versions: dict) -> None:
    assert set(versions["baseline"]) == ASSETS
    assert versions["specs"] == versions["baseline"]  # what orchestrated() attached = a recomputation
    assert len(set(versions["baseline"].values())) == len(ASSETS)  # the plots are told apart by what they draw


@pytest.mark.parametrize("edit", list(EDITS))
def test_edit_changes_exactly_the_assets_that_reach_it(versions: dict, edit: str) -> None:
    found = versions["edited"][edit]
    changed = {name for name, version in found.items() if version != versions["baseline"][name]}
    assert changed == EDITS[edit][3]


def test_result_settings_per_asset(versions: dict) -> None:
    assert versions["settings"] == {name: SETTINGS.get(name, []) for name in versions["baseline"]}
