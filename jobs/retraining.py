"""Sensors that retrain and report: a new base model version rebuilds its experiment, a new version of the expert
data retrains the experiments that opt in; failed runs are recorded."""
import json
from datetime import datetime, timezone
from pathlib import Path

from dagster import (
    AssetSelection,
    DagsterEventType,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunFailureSensorContext,
    RunRequest,
    RunsFilter,
    SensorDefinition,
    SensorEvaluationContext,
    SkipReason,
    run_failure_sensor,
    sensor,
)

from resources import StoreResource
from sand.datasets import EXPERT
from sand.experiment import Experiment
from sand.models.registry import model_files, model_hash, resolve_model
from sand.selection import training_subset
from sand.store import Store
from sand_assets.expert_data import expert_trajectories, expert_trajectories_schema
from sand_assets.models import base_model_key

DATA_VERSION_TAG = "dagster/data_version"
PENDING = [DagsterRunStatus.NOT_STARTED, DagsterRunStatus.QUEUED, DagsterRunStatus.STARTING,
           DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING]
# What a retraining run says about why it started (run tags, shown on the run's page in the UI).
REASON_TAG, DATA_TAG, NEW_TAG = "sand/retrain_reason", "sand/expert_data_version", "sand/new_trajectories"


def weights_fingerprint(path: Path) -> str:
    """Folder, names, sizes and mtimes of the files `model_hash` reads: a few stat calls, changed whenever the model
    (weights, tokenizer, chat template) can be."""
    files = model_files(path)
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


def new_trajectories(store: Store, exp: Experiment, trained: str, current: str) -> int:
    """Trajectories of D_0 version `current` that version `trained` lacks (new, or changed in content), of the
    environments and task types `exp` trains on (`train_data`, `train_tasks`): others never reach its D_0."""
    def rows(version):
        eligible = training_subset(store.read("trajectories", EXPERT, version), dict.fromkeys(exp.train_data),
                                   exp.train_tasks)
        return {json.dumps(r, sort_keys=True, default=str) for r in eligible.iter_rows(named=True)}
    return len(rows(current) - rows(trained))


def new_data_sensor(exp: Experiment) -> SensorDefinition:
    """Retrains `exp` (SFT, the iterations, the evaluations: everything of it downstream of D_0) when D_0
    (`expert_trajectories`) has a version with at least `retrain.min_new_trajectories` trajectories that the
    version it last trained on lacks, of the environments and task types it trains on. Experiments without
    `retrain.on_new_data` get no sensor.

    The state lives in the instance, not in a cursor: the version the experiment trained on is the input data
    version recorded on its last materialization that read D_0. So a D_0 version that lands while a run of
    the experiment's job is queued or running asks for nothing (that run's SFT reads the newest D_0 when it
    starts; if it started before, the next tick after it sees the version it missed): several drops before a
    run starts give one run. A version whose blocking checks failed, or have not finished, asks for nothing.
    An experiment never trained is left alone, as the base model sensor does: building it is `sand run`'s.
    """
    d0 = expert_trajectories.key
    blocking = [spec.key for spec in expert_trajectories_schema.check_specs if spec.blocking]
    chain = AssetSelection.assets(d0).downstream() & AssetSelection.groups(exp.name)
    readers = AssetSelection.assets(d0).downstream(depth=1) & AssetSelection.groups(exp.name)
    input_tag = f"dagster/input_data_version/{d0.to_user_string()}"

    @sensor(name=f"{exp.name}_new_data_sensor", job_name=exp.name, minimum_interval_seconds=30,
            default_status=DefaultSensorStatus.RUNNING,
            description=f"Retrains {exp.name} when the expert data D_0 has at least "
                        f"{exp.retrain.min_new_trajectories} new trajectories.")
    def _sensor(context: SensorEvaluationContext, store: StoreResource):
        instance = context.instance
        latest = instance.fetch_materializations(d0, limit=1).records
        if not latest:
            return SkipReason("expert_trajectories was never materialized")
        version = latest[0].asset_materialization.tags[DATA_VERSION_TAG]
        checks = instance.event_log_storage.get_latest_asset_check_execution_by_key(blocking)
        for key in blocking:
            record = checks.get(key)
            evaluation = record.event.asset_check_evaluation if record and record.event else None
            if evaluation is None or evaluation.target_materialization_data is None \
                    or evaluation.target_materialization_data.storage_id != latest[0].storage_id:
                return SkipReason(f"D_0 {version}: check {key.name} has not evaluated this version yet")
            if not evaluation.passed:
                return SkipReason(f"D_0 {version}: blocking check {key.name} failed; not retraining on it")
        graph = context.repository_def.asset_graph
        trained = [r.asset_materialization.tags.get(input_tag) for key in readers.resolve(graph)
                   for r in instance.fetch_materializations(key, limit=1).records]
        if not trained:
            return SkipReason(f"{exp.name} was never trained: `sand run {exp.name}` builds it first")
        if version in trained:
            return SkipReason(f"{exp.name} is trained on D_0 {version}")
        running = instance.get_run_records(RunsFilter(job_name=exp.name, statuses=PENDING), limit=1)
        if running:
            return SkipReason(f"run {running[0].dagster_run.run_id} of {exp.name} has not finished; "
                              "the next tick looks again")
        pair = [trained[0], version]
        seen = json.loads(context.cursor) if context.cursor else {}
        new = seen["new"] if seen.get("pair") == pair else new_trajectories(store.store(), exp, *pair)
        context.update_cursor(json.dumps({"pair": pair, "new": new}))
        if new < exp.retrain.min_new_trajectories:
            return SkipReason(f"D_0 {version}: {new} new trajectories since {trained[0]}, "
                              f"fewer than {exp.retrain.min_new_trajectories}")
        context.log.info(f"D_0 {trained[0]} -> {version} ({new} new trajectories): retraining {exp.name}")
        return RunRequest(run_key=f"{version}@{latest[0].storage_id}",
                          asset_selection=sorted(chain.resolve(graph)),
                          tags={REASON_TAG: f"new expert data: {new} new trajectories in D_0",
                                DATA_TAG: version, NEW_TAG: str(new)})

    return _sensor


def innermost_error(error):
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
                     "assets": assets.get(event.step_key, []), "error": innermost_error(event.step_failure_data.error),
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
