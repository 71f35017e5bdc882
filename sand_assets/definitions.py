"""The code location: `dagster dev` (workspace.yaml) and `dagster asset materialize -m sand_assets.definitions`."""
from dagster import Definitions, PipesSubprocessClient, load_asset_checks_from_modules, load_assets_from_modules

from jobs.experiments import experiment_job
from jobs.expert_data import (
    automation_sensor,
    compose_expert_job,
    eto_inbox_sensor,
    expert_data_job,
    import_job,
)
from jobs.retraining import base_model_sensor, new_data_sensor, run_failure_report
from resources import AlfWorldResource, ComputeResource, SciWorldResource, StoreResource
from sand.experiment import load_experiments
from sand_assets import expert_data
from sand_assets.loop import build_loop_assets
from sand_assets.models import build_model_assets
from sand_assets.scoreboard import build_scoreboard_asset

experiments = load_experiments()

defs = Definitions(
    assets=[*load_assets_from_modules([expert_data]),
            *(a for e in experiments
              for a in [*build_model_assets(e), *build_loop_assets(e), build_scoreboard_asset(e)])],
    asset_checks=load_asset_checks_from_modules([expert_data]),
    jobs=[expert_data_job, import_job, compose_expert_job, *(experiment_job(e) for e in experiments)],
    sensors=[eto_inbox_sensor, automation_sensor, *(base_model_sensor(e) for e in experiments),
             *(new_data_sensor(e) for e in experiments if e.retrain.on_new_data), run_failure_report],
    resources={"store": StoreResource(), "sciworld": SciWorldResource(), "alfworld": AlfWorldResource(),
               "compute": ComputeResource(), "pipes": PipesSubprocessClient()},
)
