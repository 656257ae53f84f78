"""The code location: ``dagster dev`` / ``dagster-webserver`` load ``defs`` from here
(``[tool.dagster] module_name`` in pyproject.toml)."""

import dagster as dg

from assets.classes import feature_classes
from assets.interactions import output_lens_tables
from assets.report import claims_report
from assets.weights import model_weights, sae_weights
from orchestration.resources import ComputeResource, HubResource, StoreResource

SAE_ASSETS = [sae_weights, model_weights, output_lens_tables, feature_classes]
ALL_ASSETS = [*SAE_ASSETS, claims_report]

sae_chain_job = dg.define_asset_job(
    "sae_chain",
    selection=dg.AssetSelection.assets(*SAE_ASSETS),
    description="Weights → output lens → feature classes for one SAE partition.",
)
report_job = dg.define_asset_job("claims_report_job", selection=dg.AssetSelection.assets(claims_report))


def resources() -> dict[str, dg.ConfigurableResource]:
    """Default resources; every field can be overridden in the UI launchpad or by environment."""
    return {"hub": HubResource(), "store": StoreResource(), "compute": ComputeResource()}


defs = dg.Definitions(assets=ALL_ASSETS, jobs=[sae_chain_job, report_job], resources=resources())
