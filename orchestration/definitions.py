"""The code location: ``dagster dev`` / ``dagster-webserver`` load ``defs`` from here
(``[tool.dagster] module_name`` in pyproject.toml)."""

import dagster as dg

from orchestration.jobs import (
    ACTIVATION_ASSETS,
    ALL_ASSETS,
    REPORT_ASSETS,
    SAE_ASSETS,
    activation_job,
    automation_sensor,
    observe_job,
    report_job,
    sae_chain_job,
)
from orchestration.resources import ComputeResource, HubResource, StoreResource
from orchestration.sensors import sae_release_schedule, sae_release_sensor

__all__ = ["defs", "resources", "ACTIVATION_ASSETS", "SAE_ASSETS", "REPORT_ASSETS"]


def resources() -> dict[str, dg.ConfigurableResource]:
    """Default resources; every field can be overridden in the UI launchpad."""
    return {"hub": HubResource(), "store": StoreResource(), "compute": ComputeResource()}


defs = dg.Definitions(
    assets=ALL_ASSETS,
    jobs=[sae_chain_job, activation_job, report_job, observe_job],
    sensors=[sae_release_sensor, automation_sensor],
    schedules=[sae_release_schedule],
    resources=resources(),
)
