"""The code location: `dagster dev` (workspace.yaml) and `dagster asset materialize -m sand_assets.definitions`."""
from __future__ import annotations

from dagster import Definitions, load_asset_checks_from_modules, load_assets_from_modules

from jobs.expert_data import automation_sensor, eto_inbox_sensor, expert_data_job, import_job, quickstart_job
from resources import AlfWorldResource, SciWorldResource, StoreResource
from sand_assets import expert_data

defs = Definitions(
    assets=load_assets_from_modules([expert_data]),
    asset_checks=load_asset_checks_from_modules([expert_data]),
    jobs=[quickstart_job, expert_data_job, import_job],
    sensors=[eto_inbox_sensor, automation_sensor],
    resources={"store": StoreResource(), "sciworld": SciWorldResource(), "alfworld": AlfWorldResource()},
)
