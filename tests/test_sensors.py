"""Retraining and failure sensors on a real Dagster instance, a real model folder and the real catalog."""
import json
import time
from datetime import datetime

import polars as pl
from dagster import (
    AssetKey,
    DagsterEventType,
    DagsterRunStatus,
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
from jobs.retraining import DATA_TAG, NEW_TAG, REASON_TAG, base_model_sensor, new_data_sensor, run_failure_report
from resources import AlfWorldResource, ComputeResource, SciWorldResource, StoreResource
from sand import datasets
from sand.experiment import load_experiments
from sand.models.registry import model_hash, tiny_model
from sand.store import Lineage, Store
from sand.trajectory import Step, Trajectory
from sand_assets import expert_data
from sand_assets.definitions import defs as shipped_defs
from sand_assets.expert_data import expert_trajectories, expert_trajectories_schema
from sand_assets.loop import build_loop_assets
from sand_assets.models import build_model_assets
from sand_assets.scoreboard import build_scoreboard_asset
from tests.conftest import DATA


def resources(home):
    return {"store": StoreResource(home=str(home)), "sciworld": SciWorldResource(), "alfworld": AlfWorldResource(),
            "compute": ComputeResource(torch_threads=1), "pipes": PipesSubprocessClient()}


def tiny_experiment(tmp_path, text: str):
    """The experiment `tiny` as its YAML file `text` loads it (from a folder of its own)."""
    experiments = tmp_path / "experiments"
    experiments.mkdir()
    (experiments / "tiny.yaml").write_text(text)
    [exp] = load_experiments(experiments)
    return exp


def test_new_base_model_version_requests_one_rebuild(sand_home, tmp_path, monkeypatch):
    model = tiny_model(tmp_path / "model")
    exp = tiny_experiment(tmp_path, f"base_model: {model}\nsand: {{iterations: 2}}\n")
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



TINY_RETRAIN = """
train_data: {alfworld: null}
retrain: {on_new_data: true, min_new_trajectories: 2}
"""


def test_new_expert_data_retrains_an_opted_in_experiment_once(sand_home, tmp_path):
    exp = tiny_experiment(tmp_path, f"base_model: {tiny_model()}\n{TINY_RETRAIN}")
    sensor = new_data_sensor(exp)
    job = experiment_job(exp)
    defs = Definitions(assets=[*load_assets_from_modules([expert_data]), *build_model_assets(exp),
                               *build_loop_assets(exp), build_scoreboard_asset(exp)],
                       asset_checks=[expert_trajectories_schema],
                       jobs=[job], sensors=[sensor], resources=resources(sand_home))
    store = Store(sand_home)
    sample = json.loads((DATA / "eto_alfworld_sample.json").read_text())

    def drop(name: str, n: int) -> None:
        """An ETO file of `n` trajectories imported into the store, and D_0 refreshed with its blocking check."""
        records = [{**sample[i % len(sample)], "id": f"{name}_{i}"} for i in range(n)]
        (tmp_path / f"{name}.json").write_text(json.dumps(records))
        datasets.import_eto(store, tmp_path / f"{name}.json", "alfworld", Lineage(asset="test"))
        refresh()

    def refresh():
        materialize([expert_trajectories, expert_trajectories_schema], resources=resources(sand_home),
                    instance=instance, raise_on_error=False)
        return store.head("trajectories", datasets.EXPERT).version

    with instance_for_test() as instance:
        def tick(cursor=None):
            context = build_sensor_context(instance=instance, definitions=defs, cursor=cursor,
                                           resources={"store": StoreResource(home=str(sand_home))})
            return sensor(context), context.cursor

        def skipped(result, reason):
            assert isinstance(result, SkipReason) and reason in result.skip_message, result
            return True

        result, cursor = tick()
        assert skipped(result, "never materialized")
        drop("first", 2)
        result, cursor = tick(cursor)
        assert skipped(result, "never trained")  # building it the first time is `sand run`'s

        # The experiment's share of D_0, the input of its SFT, is what it was trained on.
        d0 = AssetKey(["tiny", "d0"])
        assert defs.resolve_job_def("tiny").execute_in_process(instance=instance, asset_selection=[d0]).success
        result, cursor = tick(cursor)
        assert skipped(result, "is trained on D_0")

        drop("second", 1)  # one new trajectory: below min_new_trajectories
        result, cursor = tick(cursor)
        assert skipped(result, "1 new trajectories")
        # ScienceWorld trajectories never reach this ALFWorld-only experiment's D_0: they count for nothing.
        gold = [Trajectory(f"sciworld/gold/find-plant:{v}", "sciworld", "find-plant", f"find-plant:{v}", "train",
                           "gold", "Task: find a plant", [Step("", "look around", "You see a door.")], 1.0)
                for v in range(2)]
        datasets.write_source(store, "sciworld", gold, Lineage(asset="test"))
        refresh()
        result, cursor = tick(cursor)
        assert skipped(result, "1 new trajectories")
        drop("third", 2)
        version = store.head("trajectories", datasets.EXPERT).version
        started = time.perf_counter()
        request, cursor = tick(cursor)
        tick_seconds = time.perf_counter() - started
        assert isinstance(request, RunRequest), request
        assert request.tags == {REASON_TAG: "new expert data: 3 new trajectories in D_0", DATA_TAG: version,
                                NEW_TAG: "3"}
        selected = {k.to_user_string() for k in request.asset_selection}
        assert {"tiny/d0", "tiny/sft_checkpoint", "tiny/iter_0/evaluation", "tiny/iter_1/candidate_samples",
                "tiny/iter_1/finetuned_checkpoint", "tiny/iter_1/evaluation", "tiny/scoreboard"} <= selected
        assert not selected & {"tiny/base_model", "tiny/base_evaluation", "expert_trajectories"}
        again, cursor = tick(cursor)
        assert again.run_key == request.run_key  # Dagster launches one run per run key
        print(f"tick to run request: {tick_seconds:.2f} s")

        # The daemon makes the run; a fourth drop lands before it starts: no second request.
        pending = instance.create_run_for_job(job_def=defs.resolve_job_def("tiny"), tags=request.tags,
                                              status=DagsterRunStatus.NOT_STARTED,
                                              asset_selection=frozenset(request.asset_selection))
        drop("fourth", 2)
        newest = store.head("trajectories", datasets.EXPERT).version
        result, cursor = tick(cursor)
        assert skipped(result, f"run {pending.run_id} of tiny has not finished")
        # The run starts (here: its first step, in process): it reads the newest D_0, so one run answered both drops.
        instance.delete_run(pending.run_id)
        trained = defs.resolve_job_def("tiny").execute_in_process(instance=instance, asset_selection=[d0],
                                                                  tags=request.tags)
        assert trained.success and instance.get_run_by_id(trained.run_id).tags[DATA_TAG] == version
        [event] = trained.get_asset_materialization_events()
        assert event.materialization.tags["dagster/input_data_version/expert_trajectories"] == newest
        result, cursor = tick(cursor)
        assert skipped(result, f"is trained on D_0 {newest}")

        # A source whose rows fail D_0's blocking check (written past the import's validation): no retraining.
        bad = store.read("source_trajectories", "import/fourth").with_columns(
            id="bad_" + pl.col("id"), reward=pl.lit(1.5))
        store.write("source_trajectories", "import/bad", bad, Lineage(asset="test"))
        assert refresh() != newest
        result, cursor = tick(cursor)
        assert skipped(result, "blocking check expert_trajectories_schema failed")


def test_only_opted_in_experiments_get_a_new_data_sensor():
    sensors = {s.name for s in shipped_defs.sensors}
    assert "quickstart_new_data_sensor" in sensors  # quickstart opts in
    assert not sensors & {"paper_new_data_sensor", "cpu_bench_new_data_sensor"}
