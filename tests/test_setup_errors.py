"""Configuration and setup errors are reported before any work starts; a failed `sand run` says so and
reaches run_failures without the daemon."""
import pytest

from jobs.cli import main as sand_main
from sand import preflight, stages
from sand.errors import SandError
from sand.experiment import Experiment, load_experiment
from sand.store import Lineage, Store


def test_unknown_environment_keys_are_rejected_naming_them(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("train_data: {alfwrld: 6}\n"
                    "evaluation: {envs: {alfworld: {splits: [heldout]}, sciwrld: {splits: [dev]}}}\n"
                    "sand: {trajectories: {alfword: 3}}\n")
    with pytest.raises(SandError) as error:
        load_experiment(path)
    for key in ("train_data.alfwrld", "evaluation.envs.sciwrld", "sand.trajectories.alfword"):
        assert key in str(error.value)


def test_missing_java_games_and_model_are_named_before_work(tmp_path, monkeypatch):
    not_a_model = tmp_path / "model"
    not_a_model.mkdir()
    exp = Experiment(name="x", base_model=str(not_a_model),
                     evaluation={"envs": {"alfworld": {"splits": ["valid_seen"]}, "sciworld": {"splits": ["dev"]}}})
    monkeypatch.setenv("PATH", str(tmp_path))  # no java
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path / "nothing"))
    found = preflight.problems(exp)
    assert len(found) == 3
    assert "java" in found[0] and "ALFWORLD_DATA" in found[1] and "config.json" in found[2]
    with pytest.raises(SandError, match="cannot run here"):
        preflight.check_experiment(exp)
    # Generated games only: no ALFWORLD_DATA needed.
    heldout = Experiment(name="y", train_data={"alfworld": 2},
                         evaluation={"envs": {"alfworld": {"splits": ["heldout"]}}})
    assert preflight.problems(heldout) == []
    # A stage started anywhere (the UI, a sensor, a notebook) checks first: nothing is trained or stored.
    store = Store(tmp_path / "home")
    with pytest.raises(SandError, match="ALFWORLD_DATA"):
        stages.finetune(exp, store, 0, lambda table: Lineage(asset="test"))
    assert not (tmp_path / "home" / "checkpoints").exists()


def test_failed_run_says_so_and_reaches_run_failures_without_the_daemon(sand_home, capsys):
    with pytest.raises(SystemExit) as exit_:
        sand_main(["run", "import_eto"])  # fails in its step: no inbox file named as its partition
    out, err = capsys.readouterr()
    assert exit_.value.code == 1 and "FAILED" in out and "imported_trajectories" in err
    rows = Store(sand_home).sql("select job, step, error from run_failures").rows(named=True)
    assert [(r["job"], r["step"]) for r in rows] == [("import_eto", "imported_trajectories")]
    assert "partition" in rows[0]["error"]


def test_train_tasks_restrict_d0_and_name_what_is_wrong(tmp_path):
    from sand.datasets import compose_expert, write_source
    from sand.trajectory import Step, Trajectory

    store = Store(tmp_path / "home")
    expert = [Trajectory(f"sciworld/gold/{task}:{v}", "sciworld", task, f"{task}:{v}", "train", "gold", "Task: x",
                         [Step("", "look around", "You see a door.")], 1.0)
              for task in ("find-animal", "find-plant", "boil") for v in range(3)]
    write_source(store, "sciworld", expert, Lineage(asset="test"))
    compose_expert(store, Lineage(asset="test"))
    lineage_of = lambda table: Lineage(asset="test")  # noqa: E731

    exp = Experiment(name="short", train_data={"sciworld": 4}, train_tasks={"sciworld": ["find-animal", "find-plant"]})
    stages.select_d0(exp, store, lineage_of)
    d0 = store.read("trajectories", "short/d0")
    assert d0.height == 4 and set(d0["task"]) == {"find-animal", "find-plant"}
    everything = Experiment(name="all", train_data={"sciworld": None})
    stages.select_d0(everything, store, lineage_of)
    assert store.read("trajectories", "all/d0").height == 9

    # A task type the expert set lacks is named, and nothing is written for the experiment.
    typo = Experiment(name="typo", train_data={"sciworld": None},
                      train_tasks={"sciworld": ["find-animal", "fnd-plant"]})
    with pytest.raises(SandError, match=r"train_tasks\.sciworld .*: fnd-plant$"):
        stages.select_d0(typo, store, lineage_of)
    assert store.head("trajectories", "typo/d0") is None
    # Task types of an environment the experiment does not train on are a mistake in its file.
    path = tmp_path / "untrained.yaml"
    path.write_text("train_data: {alfworld: 6}\ntrain_tasks: {sciworld: [find-animal]}\n")
    with pytest.raises(SandError, match="untrained.yaml.*train_tasks names sciworld, which train_data does not"):
        load_experiment(path)
