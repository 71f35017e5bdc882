"""Retraining and failure sensors on a real Dagster instance, a real model folder and the real catalog."""
from datetime import datetime

from dagster import (
    AssetKey,
    DagsterEventType,
    Definitions,
    PipesSubprocessClient,
    RunRequest,
    SkipReason,
    asset,
    build_run_status_sensor_context,
    build_sensor_context,
    instance_for_test,
    load_assets_from_modules,
    materialize,
)
from safetensors.numpy import load_file, save_file

import jobs.retraining
from jobs.experiments import experiment_job
from jobs.retraining import base_model_sensor, run_failure_report
from resources import AlfWorldResource, ComputeResource, SciWorldResource, StoreResource
from sand.experiment import load_experiments
from sand.models.registry import model_hash, tiny_model
from sand.store import Store
from sand_assets import expert_data
from sand_assets.loop import build_loop_assets
from sand_assets.models import build_model_assets


def resources(home):
    return {"store": StoreResource(home=str(home)), "sciworld": SciWorldResource(), "alfworld": AlfWorldResource(),
            "compute": ComputeResource(), "pipes": PipesSubprocessClient()}


def test_new_base_model_version_requests_one_rebuild(sand_home, tmp_path, monkeypatch):
    model = tiny_model(tmp_path / "model")
    experiments = tmp_path / "experiments"
    experiments.mkdir()
    (experiments / "tiny.yaml").write_text(f"base_model: {model}\nsand: {{iterations: 2}}\n")
    [exp] = load_experiments(experiments)
    sensor = base_model_sensor(exp)
    model_assets = build_model_assets(exp)
    defs = Definitions(assets=[*load_assets_from_modules([expert_data]), *model_assets, *build_loop_assets(exp)],
                       jobs=[experiment_job(exp)], sensors=[sensor], resources=resources(sand_home))
    hashes = []
    monkeypatch.setattr(jobs.retraining, "model_hash", lambda path: hashes.append(path) or model_hash(path))

    with instance_for_test() as instance:
        def tick(cursor=None):
            context = build_sensor_context(instance=instance, definitions=defs, cursor=cursor)
            return sensor(context), context.cursor

        # Never materialized: nothing was built from any version, so nothing to rebuild (and no hashing).
        result, cursor = tick()
        assert isinstance(result, SkipReason) and "never materialized" in result.skip_message and not hashes
        base_model = model_assets[0]
        assert materialize([base_model], instance=instance, resources=resources(sand_home)).success
        result, cursor = tick(cursor)
        assert isinstance(result, SkipReason) and "unchanged" in result.skip_message
        # Unchanged files: the weights are not hashed again.
        result, cursor = tick(cursor)
        assert isinstance(result, SkipReason) and len(hashes) == 1

        weights = model / "model.safetensors"
        tensors = load_file(weights)
        name = next(iter(tensors))
        tensors[name] = tensors[name] * 1.5
        save_file(tensors, weights, metadata={"format": "pt"})
        new_version = model_hash(weights.parent)

        request, cursor = tick(cursor)
        assert isinstance(request, RunRequest) and request.run_key.startswith(new_version)
        selected = {k.to_user_string() for k in request.asset_selection}
        assert {"tiny/base_model", "tiny/sft_checkpoint", "tiny/iter_0/evaluation", "tiny/iter_2/evaluation",
                "tiny/iter_1/finetuned_checkpoint"} <= selected
        assert "expert_trajectories" not in selected and "alfworld_training_games" not in selected
        # The same version asks for the same run key, which Dagster launches once.
        again, cursor = tick(cursor)
        assert again.run_key == request.run_key and len(hashes) == 2

        # The rebuild materializes the new version: nothing more to do.
        rebuilt = materialize([base_model], instance=instance, resources=resources(sand_home))
        [event] = rebuilt.get_asset_materialization_events()
        assert event.materialization.tags["dagster/data_version"] == new_version
        result, cursor = tick(cursor)
        assert isinstance(result, SkipReason) and "unchanged" in result.skip_message


@asset(key=AssetKey(["tiny", "broken"]))
def broken() -> None:
    raise ValueError("the weights folder vanished")


def test_failed_run_is_logged_and_lands_in_run_failures(sand_home):
    store = Store(sand_home)
    assert store.sql("select count(*) from run_failures").item() == 0  # the view exists before any failure
    with instance_for_test() as instance:
        result = materialize([broken], instance=instance, raise_on_error=False)
        assert not result.success
        run = instance.get_run_by_id(result.run_id)
        [failure] = instance.get_records_for_run(run.run_id, of_type=DagsterEventType.RUN_FAILURE).records
        context = build_run_status_sensor_context(
            sensor_name="run_failure_sensor", dagster_event=failure.event_log_entry.dagster_event,
            dagster_instance=instance, dagster_run=run, resources={"store": StoreResource(home=str(sand_home))},
        ).for_run_failure()
        run_failure_report(context)
        run_failure_report(context)  # reported twice (a retried tick): still one row

    rows = store.sql("select * from run_failures").rows(named=True)
    assert len(rows) == 1
    row = rows[0]
    assert row["run_id"] == result.run_id and row["job"] == run.job_name
    assert row["step"] == "tiny__broken" and row["assets"] == ["tiny/broken"]
    assert row["error"] == "ValueError: the weights folder vanished"
    assert isinstance(row["failed_at"], datetime)

