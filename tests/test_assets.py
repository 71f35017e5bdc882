"""The expert-data assets on a real Dagster instance, real environments and a real DuckDB catalog."""
import json
import shutil

import pytest
from dagster import (
    DagsterInstance,
    Definitions,
    build_sensor_context,
    evaluate_automation_conditions,
    instance_for_test,
    materialize,
)

from jobs.expert_data import eto_inbox_sensor
from resources import AlfWorldResource, SciWorldResource, StoreResource
from sand.store import Store
from sand_assets.definitions import defs
from sand_assets.expert_data import (
    alfworld_heldout_games,
    alfworld_source_trajectories,
    alfworld_training_games,
    eto_inbox_partitions,
    expert_trajectories,
    expert_trajectories_schema,
    imported_trajectories,
    sciworld_source_trajectories,
)
from tests.conftest import DATA

SMALL_SCIWORLD = {"ops": {"sciworld_source_trajectories": {"config": {
    "tasks": ["find-plant", "lifespan-longest-lived"], "variations_per_task": 1}}}}


def resources(home):
    return {"store": StoreResource(home=str(home)), "sciworld": SciWorldResource(),
            "alfworld": AlfWorldResource(train_games=6, max_steps=50)}


def test_definitions_load():
    defs.resolve_all_job_defs()
    assert {j.name for j in defs.resolve_all_job_defs()} >= {"quickstart", "expert_data", "import_eto"}


def test_expert_data_pipeline(sand_home):
    with instance_for_test() as instance:
        result = materialize(
            [alfworld_training_games, alfworld_source_trajectories, sciworld_source_trajectories,
             imported_trajectories, expert_trajectories, expert_trajectories_schema],
            selection=[alfworld_training_games, alfworld_source_trajectories, sciworld_source_trajectories,
                       expert_trajectories, expert_trajectories_schema],
            resources=resources(sand_home), run_config=SMALL_SCIWORLD, instance=instance)
        assert result.success
        mats = {m.asset_key.to_user_string(): m for m in result.get_asset_materialization_events()}
        expert = mats["expert_trajectories"].materialization
        assert expert.metadata["rows/alfworld"].value == 6 and expert.metadata["rows/sciworld"].value == 2
        checks = result.get_asset_check_evaluations()
        assert [c.passed for c in checks] == [True]

        store = Store(sand_home)
        version = store.head("trajectories", "expert").version
        assert expert.tags["dagster/data_version"] == version
        by_env = dict(store.sql("select env, count(*) from trajectories group by env order by env").iter_rows())
        assert by_env == {"alfworld": 6, "sciworld": 2}
        tasks = store.sql("select distinct task from trajectories where env = 'alfworld'")["task"].to_list()
        assert len(tasks) == 6  # the generator covers every ALFWorld task type
        assert store.sql("select min(reward) from trajectories").item() == 1.0
        lineage = store.sql("select asset, run_id, len(inputs) as n_inputs from lineage "
                            "where asset = 'expert_trajectories'")
        assert lineage.rows() == [("expert_trajectories", result.run_id, 2)]

        # Re-materializing with unchanged inputs writes nothing new.
        before = sorted(p.name for p in (sand_home / "datasets").rglob("*.parquet"))
        again = materialize([expert_trajectories], resources=resources(sand_home), instance=instance)
        assert again.success
        assert sorted(p.name for p in (sand_home / "datasets").rglob("*.parquet")) == before


def drop(home, name, records=None):
    inbox = StoreResource(home=str(home)).inbox("alfworld")
    path = inbox / name
    if records is None:
        shutil.copy(DATA / "eto_alfworld_sample.json", path)
    else:
        path.write_text(json.dumps(records))
    return path


def run_sensor(instance: DagsterInstance, home, cursor: str | None = None):
    ctx = build_sensor_context(instance=instance, cursor=cursor, resources={"store": StoreResource(home=str(home))})
    result = eto_inbox_sensor(ctx)
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def run_sensor_twice(instance: DagsterInstance, home):
    """Two evaluations, the second with the first's cursor: a file unchanged in between has settled."""
    return run_sensor(instance, home, run_sensor(instance, home).cursor)


def test_inbox_sensor_imports_and_triggers_expert_refresh(sand_home):
    with instance_for_test() as instance:
        assert run_sensor(instance, sand_home).run_requests == []
        drop(sand_home, "demo.json")
        result = run_sensor_twice(instance, sand_home)
        [request] = result.run_requests
        assert request.partition_key == "alfworld/demo.json"
        assert instance.get_dynamic_partitions(eto_inbox_partitions.name) == ["alfworld/demo.json"]
        # Unchanged file: the same run key, which Dagster never runs twice.
        assert run_sensor(instance, sand_home, result.cursor).run_requests[0].run_key == request.run_key

        automation_defs = Definitions(assets=[imported_trajectories, expert_trajectories],
                                      resources=resources(sand_home))
        baseline = evaluate_automation_conditions(defs=automation_defs, instance=instance)
        imported = materialize([imported_trajectories, expert_trajectories], selection=[imported_trajectories],
                               partition_key=request.partition_key, resources=resources(sand_home), instance=instance)
        assert imported.success
        store = Store(sand_home)
        assert store.read("source_trajectories", "import/demo").height == 2

        # Declarative automation asks for expert_trajectories once its input changed...
        evaluation = evaluate_automation_conditions(defs=automation_defs, instance=instance, cursor=baseline.cursor)
        assert evaluation.get_num_requested(expert_trajectories.key) == 1
        refreshed = materialize([expert_trajectories], resources=resources(sand_home), instance=instance)
        assert refreshed.success
        assert store.sql("select count(*) from trajectories where dataset = 'expert'").item() == 2

        # A changed file is a new run; a malformed one fails its run and stores nothing.
        records = json.loads((DATA / "eto_alfworld_sample.json").read_text())
        records[0]["conversations"][3]["value"] = "I go somewhere"
        drop(sand_home, "demo.json", records)
        [changed] = run_sensor_twice(instance, sand_home).run_requests
        assert changed.run_key != request.run_key
        failed = materialize([imported_trajectories], partition_key="alfworld/demo.json",
                             resources=resources(sand_home), instance=instance, raise_on_error=False)
        assert not failed.success
        assert store.read("source_trajectories", "import/demo").height == 2  # the earlier version stays current


@pytest.mark.parametrize("name", ["notes.txt", ".hidden.json", ".copying.parquet"])
def test_inbox_sensor_ignores_other_files(sand_home, name):
    with instance_for_test() as instance:
        (StoreResource(home=str(sand_home)).inbox("sciworld") / name).write_text("{}")
        assert run_sensor_twice(instance, sand_home).run_requests == []


def test_inbox_sensor_waits_for_a_copy_to_settle(sand_home):
    """A file is imported only once an evaluation finds it as the previous one did (size and modification time);
    a copy made under a dot-name is imported once renamed, and settled, whatever its format."""
    inbox = StoreResource(home=str(sand_home)).inbox("alfworld")
    with instance_for_test() as instance:
        copying = inbox / "growing.jsonl"
        copying.write_text("{}\n")
        first = run_sensor(instance, sand_home)
        assert first.run_requests == [] and first.dynamic_partitions_requests == []
        with copying.open("a") as f:
            f.write("{}\n")  # still being copied at the next evaluation
        second = run_sensor(instance, sand_home, first.cursor)
        assert second.run_requests == []
        settled = run_sensor(instance, sand_home, second.cursor)
        assert [r.partition_key for r in settled.run_requests] == ["alfworld/growing.jsonl"]

        hidden = inbox / ".data.parquet"
        hidden.write_text("copying")
        assert [r.partition_key for r in run_sensor_twice(instance, sand_home).run_requests] == [
            "alfworld/growing.jsonl"]
        hidden.rename(inbox / "data.parquet")
        renamed = run_sensor(instance, sand_home, settled.cursor)
        assert [r.partition_key for r in renamed.run_requests] == ["alfworld/growing.jsonl"]
        assert [r.partition_key for r in run_sensor(instance, sand_home, renamed.cursor).run_requests] == [
            "alfworld/data.parquet", "alfworld/growing.jsonl"]
        assert instance.get_dynamic_partitions(eto_inbox_partitions.name) == [
            "alfworld/growing.jsonl", "alfworld/data.parquet"]


def test_heldout_games_are_their_own_split_and_never_the_training_games(sand_home):
    alfworld = AlfWorldResource(train_games=3, heldout_games=3)
    with instance_for_test() as instance:
        assert materialize([alfworld_training_games, alfworld_heldout_games], instance=instance,
                           resources={"alfworld": alfworld}).success
        with alfworld.open() as env:
            train, heldout = env.tasks("train"), env.tasks("heldout")
            assert len(train) == len(heldout) == 3 and {t.split for t in heldout} == {"heldout"}
            games = {split: {(env.game_dir(t) / "game.tw-pddl").read_bytes() for t in tasks}
                     for split, tasks in (("train", train), ("heldout", heldout))}
            assert not games["train"] & games["heldout"]
        with AlfWorldResource(heldout_games=2).open() as fewer:  # the folder holds 3: evaluate only the 2 configured
            assert fewer.tasks("heldout") == [t for t in heldout if t.task_id.endswith(("00000", "00001"))]
        same_seed = materialize([alfworld_heldout_games], instance=instance, raise_on_error=False,
                                resources={"alfworld": AlfWorldResource(heldout_seed=0)})
        assert not same_seed.success
        failure = same_seed.get_step_failure_events()[0].step_failure_data.user_failure_data
        assert "would be the training games" in failure.description


def test_alfworld_source_records_the_configured_share_of_a_larger_game_pool(sand_home):
    with instance_for_test() as instance:
        assert materialize([alfworld_training_games], instance=instance,
                           resources={"alfworld": AlfWorldResource(train_games=3)}).success
        fewer = {"alfworld": AlfWorldResource(train_games=2), "store": StoreResource(home=str(sand_home))}
        assert materialize([alfworld_source_trajectories], instance=instance, resources=fewer).success
        recorded = Store(sand_home).sql("select task_id from source_trajectories_current")["task_id"].to_list()
        assert sorted(t.rsplit("_", 1)[1] for t in recorded) == ["00000", "00001"]
        assert materialize([alfworld_source_trajectories], instance=instance,
                           resources={**fewer, "alfworld": AlfWorldResource(train_games=3)}).success
        [log] = (sand_home / "work" / "experts").iterdir()  # one recording per game: the first two were reused
        assert len(list(log.glob("part-*.parquet"))) == 3
        more = materialize([alfworld_source_trajectories], instance=instance, raise_on_error=False,
                           resources={**fewer, "alfworld": AlfWorldResource(train_games=4)})
        failure = more.get_step_failure_events()[0].step_failure_data.user_failure_data
        assert "trial_sand_s0_00003" in failure.description and "is missing" in failure.description
