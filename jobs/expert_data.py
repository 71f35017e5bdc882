"""Jobs that build the expert set, and the inbox sensor that imports dropped trajectory files."""
from __future__ import annotations

import json

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
from sand.formats.eto import SUFFIXES
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
        description="Imports trajectory files dropped into SAND_HOME/inbox/<env>/ once they have settled; "
                    "expert_trajectories follows eagerly.")
def eto_inbox_sensor(context: SensorEvaluationContext, store: StoreResource) -> SensorResult:
    """A file is imported once its size and modification time are those the previous evaluation saw (the cursor
    keeps them): one still being copied in is left until the copy ends. Dot-files are never imported, so a copy
    made under a dot-name and renamed when complete is imported whole however slowly it is written."""
    seen = json.loads(context.cursor) if context.cursor else {}
    known = set(context.instance.get_dynamic_partitions(eto_inbox_partitions.name))
    now, requests = {}, []
    for env in ENVS:
        for path in sorted(store.inbox(env).iterdir()):
            if path.suffix not in SUFFIXES or path.name.startswith("."):
                continue
            key, stat = f"{env}/{path.name}", path.stat()
            now[key] = f"{stat.st_mtime_ns}:{stat.st_size}"
            if seen.get(key) == now[key]:
                # A changed file (new mtime or size) is a new run; an unchanged one is never re-run.
                requests.append(RunRequest(run_key=f"{key}@{now[key]}", partition_key=key))
    new = [r.partition_key for r in requests if r.partition_key not in known]
    return SensorResult(run_requests=requests, cursor=json.dumps(now),
                        dynamic_partitions_requests=[eto_inbox_partitions.build_add_request(new)] if new else [])


automation_sensor = AutomationConditionSensorDefinition(
    "automation", target=AssetSelection.all(), minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="Declarative automation: eager assets follow their inputs (retraining after new expert data).")
