"""Sensors that retrain and report: a new base model version rebuilds its experiment; failed runs are recorded."""
import json
from datetime import datetime, timezone
from pathlib import Path

from dagster import (
    AssetSelection,
    DagsterEventType,
    DagsterInstance,
    DagsterRun,
    DefaultSensorStatus,
    RunFailureSensorContext,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SkipReason,
    run_failure_sensor,
    sensor,
)

from resources import StoreResource
from sand.experiment import Experiment
from sand.models.registry import model_hash, resolve_model
from sand_assets.models import base_model_key

DATA_VERSION_TAG = "dagster/data_version"


def weights_fingerprint(path: Path) -> str:
    """Folder, names, sizes and mtimes of the weight files: a few stat calls, changed whenever the weights can be."""
    files = sorted(path.glob("*.safetensors"))
    return json.dumps([str(path), *([f.name, s.st_size, s.st_mtime_ns] for f in files for s in [f.stat()])])


def base_model_sensor(exp: Experiment) -> SensorDefinition:
    """Requests a rebuild of `exp` from `<exp>/base_model` down when the base model's weights hash changes.

    The hash (`model_hash`, sha256 over every weight file: 16 GB read for an 8B model) is computed only when the
    cheap fingerprint differs from the one kept in the cursor; it is then compared with the data version of
    the last materialization of `<exp>/base_model`. The run key is the new version plus the materialization it
    replaces, so a version triggers one run per change (and a model reverted to an earlier version rebuilds too).

    An experiment whose base model was never materialized is left alone: nothing was built from any version,
    building it the first time is the user's call (`sand run`), and the sensor never resolves, converts or
    downloads a model nobody asked for.
    """
    key = base_model_key(exp)
    affected = AssetSelection.assets(key).downstream() & AssetSelection.groups(exp.name)

    @sensor(name=f"{exp.name}_base_model_sensor", job_name=exp.name, minimum_interval_seconds=60,
            default_status=DefaultSensorStatus.RUNNING,
            description=f"Rebuilds {exp.name} from its base model down when {exp.base_model} changes version.")
    def _sensor(context: SensorEvaluationContext):
        records = context.instance.fetch_materializations(key, limit=1).records
        if not records:
            return SkipReason(f"{key.to_user_string()} was never materialized: nothing to rebuild")
        last = records[0]
        built = last.asset_materialization.tags.get(DATA_VERSION_TAG)
        path = resolve_model(exp.base_model)
        fingerprint = weights_fingerprint(path)
        seen = json.loads(context.cursor) if context.cursor else {}
        version = seen["version"] if seen.get("fingerprint") == fingerprint else model_hash(path)
        context.update_cursor(json.dumps({"fingerprint": fingerprint, "version": version}))
        if version == built:
            return SkipReason(f"{exp.base_model} unchanged ({version[:12]})")
        context.log.info(f"{exp.base_model}: {built} -> {version}; rebuilding {exp.name}")
        return RunRequest(run_key=f"{version}@{last.storage_id}",
                          asset_selection=sorted(affected.resolve(context.repository_def.asset_graph)),
                          tags={"sand/base_model_version": version})

    return _sensor


def _innermost(error):
    # Dagster wraps a step's exception (DagsterExecutionStepExecutionError); the user's one is the last cause.
    while error.cause is not None:
        error = error.cause
    return error.message.strip()


def failure_rows(instance: DagsterInstance, run: DagsterRun, run_message: str) -> list[dict]:
    """One row per failed step of `run` (or one for the run itself when no step failed)."""
    plan = instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id) \
        if run.execution_plan_snapshot_id else None
    assets = {step.key: [o.properties.asset_key.to_user_string() for o in step.outputs
                         if o.properties and o.properties.asset_key] for step in (plan.steps if plan else [])}
    rows = []
    for record in instance.get_records_for_run(run.run_id, of_type=DagsterEventType.STEP_FAILURE).records:
        event = record.event_log_entry.dagster_event
        rows.append({"run_id": run.run_id, "job": run.job_name, "step": event.step_key,
                     "assets": assets.get(event.step_key, []), "error": _innermost(event.step_failure_data.error),
                     "failed_at": datetime.fromtimestamp(record.event_log_entry.timestamp, timezone.utc)})
    if not rows:
        record = instance.get_run_record_by_id(run.run_id)
        ended = record.end_time if record and record.end_time else datetime.now(timezone.utc).timestamp()
        rows.append({"run_id": run.run_id, "job": run.job_name, "step": None, "assets": [], "error": run_message,
                     "failed_at": datetime.fromtimestamp(ended, timezone.utc)})
    return rows


@run_failure_sensor(name="run_failure_sensor", default_status=DefaultSensorStatus.RUNNING,
                    description="Logs every failed run and records its failed steps in the view run_failures.")
def run_failure_report(context: RunFailureSensorContext, store: StoreResource) -> None:
    run = context.dagster_run
    rows = failure_rows(context.instance, run, context.failure_event.message or "")
    for row in rows:
        context.log.error(f"run {run.run_id} ({run.job_name}) failed at {row['step'] or 'run level'} "
                          f"{row['assets']}: {row['error']}")
    path = store.store().record_run_failure(run.run_id, rows)
    context.log.info(f"recorded in run_failures ({path})")
