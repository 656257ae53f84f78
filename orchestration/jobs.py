"""The assets as the orchestration sees them — versioned and with automation conditions — and jobs.

Automation (declarative; ``automation_sensor`` evaluates it every 30 s and is RUNNING by default, so
``dagster dev`` keeps results fresh without a click):
- weight assets rerun when their code version changes; new or changed SAE files reach them through
  ``sae_release_sensor`` runs (it knows the hub, automation does not);
- the pool-``compute`` assets (``lens_tables``, ``circuit_tables``: GPU-hours on a real release) are
  ``eager()`` only: they rerun when their inputs change (new or changed SAE files), never silently because
  their own code changed — that takes an explicit ``python -m orchestration.cli materialize --force`` or a
  backfill in the UI;
- every other downstream asset is ``eager() | code_version_changed()``: it reruns when a parent was updated
  or its own code changed, and is left alone otherwise; ``claim_statistics`` without eager's wait for missing
  dependencies, so the report updates from the SAEs that are stored and names the missing layers.
Partitions that were already missing when automation first saw them are not filled by ``eager()``:
materialise them with ``python -m orchestration.cli materialize`` or a backfill in the UI.
"""

import dagster as dg

from assets.activations import activation_agreement
from assets.claims import claim_statistics
from assets.classes import feature_classes
from assets.interactions import circuit_tables, lens_tables
from assets.plots import PLOT_ASSETS
from assets.report import claims_report
from assets.sources import sae_files
from assets.weights import model_weights, sae_weights
from orchestration.versions import code_version

ON_CODE_CHANGE = dg.AutomationCondition.code_version_changed()
ON_UPDATE = dg.AutomationCondition.eager()
ON_UPDATE_OR_CODE_CHANGE = ON_UPDATE | ON_CODE_CHANGE
# the release-level statistics read whatever SAE partitions are stored: one missing or failed SAE must not hold
# the report back forever (``eager()`` waits while any dependency partition is missing)
ON_ANY_UPDATE_OR_CODE_CHANGE = (
    ON_UPDATE.without(~dg.AutomationCondition.any_deps_missing()).with_label("eager_allow_missing") | ON_CODE_CHANGE
)


def orchestrated(asset: dg.AssetsDefinition, condition: dg.AutomationCondition | None) -> dg.AssetsDefinition:
    """The asset with an automation condition (None: none, materialised on request) and a code version derived
    from the code its compute function reaches and the default settings it reads (``orchestration.versions``)."""
    version = code_version(asset.op.compute_fn.decorated_fn)
    return asset.map_asset_specs(
        lambda spec: spec.replace_attributes(code_version=version, automation_condition=condition)
    )


SAE_ASSETS = [
    orchestrated(sae_weights, ON_CODE_CHANGE),
    orchestrated(model_weights, ON_CODE_CHANGE),
    orchestrated(lens_tables, ON_UPDATE),  # pool "compute": a code change is recomputed on request only
    orchestrated(circuit_tables, ON_UPDATE),
    orchestrated(feature_classes, ON_UPDATE_OR_CODE_CHANGE),
]
# optional, for releases with a corpus (the trained ones): no automation condition, so it never runs on the
# partitions of releases without one; materialised on request (README, "Trained releases")
ACTIVATION_ASSETS = [orchestrated(activation_agreement, None)]
REPORT_ASSETS = [
    orchestrated(claim_statistics, ON_ANY_UPDATE_OR_CODE_CHANGE),
    *(orchestrated(asset, ON_UPDATE_OR_CODE_CHANGE) for asset in (*PLOT_ASSETS, claims_report)),
]
ALL_ASSETS = [sae_files, *SAE_ASSETS, *ACTIVATION_ASSETS, *REPORT_ASSETS]

sae_chain_job = dg.define_asset_job(
    "sae_chain",
    selection=dg.AssetSelection.assets(*SAE_ASSETS),
    description="Weights → lenses and attention circuits → feature classes for one SAE partition.",
)
activation_job = dg.define_asset_job(
    "activation_agreement_job",
    selection=dg.AssetSelection.assets(*ACTIVATION_ASSETS),
    description="Run the model on the release's corpus and compare each feature's activations with its lenses.",
)
report_job = dg.define_asset_job("claims_report_job", selection=dg.AssetSelection.assets(*REPORT_ASSETS))
automation_sensor = dg.AutomationConditionSensorDefinition(
    "automation_sensor",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Evaluates every asset's automation condition (orchestration/jobs.py docstring).",
)
observe_job = dg.define_asset_job(
    "observe_sae_files",
    selection=dg.AssetSelection.assets(sae_files.key),
    description="Record the current content id of every registered SAE's files (the UI's 'Observe sources').",
)
