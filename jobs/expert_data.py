"""Jobs that build the expert set, and the inbox sensor that imports dropped ETO files."""
from __future__ import annotations

from dagster import (
    AssetSelection,
    AutomationConditionSensorDefinition,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    define_asset_job,
    sensor,
)

from resources import StoreResource
from sand.trajectory import ENVS
from sand_assets.expert_data import eto_inbox_partitions, expert_trajectories, imported_trajectories

expert_data_job = define_asset_job(
    "expert_data",
    selection=AssetSelection.groups("expert_data") - AssetSelection.assets(imported_trajectories),
    description="Generate ALFWorld training games, record ScienceWorld and ALFWorld experts, compose D_0.",
)

import_job = define_asset_job("import_eto", selection=[imported_trajectories],
                              description="Import one ETO file (partition = <env>/<file>): the inbox's, or the "
                                          "one at the run config's path (`sand import`).")

compose_expert_job = define_asset_job("compose_expert", selection=AssetSelection.assets(expert_trajectories),
                                      description="Compose D_0 (expert_trajectories, with its schema check) from "
                                                  "the current sources: `sand import` runs it after import_eto.")


@sensor(job=import_job, minimum_interval_seconds=30, default_status=DefaultSensorStatus.RUNNING,
        description="Imports ETO files dropped into SAND_HOME/inbox/<env>/; expert_trajectories follows eagerly.")
def eto_inbox_sensor(context: SensorEvaluationContext, store: StoreResource) -> SensorResult:
    known = set(context.instance.get_dynamic_partitions(eto_inbox_partitions.name))
    keys, requests = [], []
    for env in ENVS:
        for path in sorted(store.inbox(env).iterdir()):
            if path.suffix not in (".json", ".jsonl") or path.name.startswith("."):
                continue
            key, stat = f"{env}/{path.name}", path.stat()
            keys.append(key)
            # A changed file (new mtime or size) is a new run; an unchanged one is never re-run.
            requests.append(RunRequest(run_key=f"{key}@{stat.st_mtime_ns}:{stat.st_size}", partition_key=key))
    new = [k for k in keys if k not in known]
    return SensorResult(run_requests=requests,
                        dynamic_partitions_requests=[eto_inbox_partitions.build_add_request(new)] if new else [])


automation_sensor = AutomationConditionSensorDefinition(
    "automation", target=AssetSelection.all(), minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="Declarative automation: eager assets follow their inputs (retraining after new expert data).")
