"""Imported data the platform did not make itself: ScienceWorld gold paths and ALFWorld observer runs recorded
here, exported as ETO files stripped of everything the platform adds, imported, matched to their tasks,
verified by replay, and deliberated over by a SAND iteration with the tiny model."""
import dataclasses
import json
import os

import pytest
from dagster import PipesSubprocessClient, instance_for_test, materialize

from resources import AlfWorldResource, ComputeResource, SciWorldResource, StoreResource
from sand import datasets
from sand.envs.alfworld import AlfWorldEnv
from sand.envs.sciworld import ScienceWorldEnv
from sand.experiment import EnvEval, EvalConfig, Experiment, SandConfig, TrainConfig
from sand.experts import record_expert
from sand.formats import eto, resolve
from sand.models.registry import tiny_model
from sand.selection import replayable
from sand.store import Lineage, Store
from sand_assets.expert_data import expert_trajectories
from sand_assets.loop import build_loop_assets
from sand_assets.models import build_model_assets

SCIWORLD_TASKS = ["lifespan-longest-lived", "find-non-living-thing"]  # short gold paths; shared descriptions


def _altered(t, step: int):
    steps = list(t.steps)
    steps[step] = dataclasses.replace(steps[step], observation=steps[step].observation + " A bird sings.")
    return dataclasses.replace(t, steps=steps)


@pytest.fixture(scope="module")
def imported(home, tmp_path_factory):
    """(originals, imported) per env. Files: recorded trajectories, one copy with an observation altered, and
    (ALFWorld) a trajectory from a valid_unseen game, resolved where only valid_seen games are present."""
    data = tmp_path_factory.mktemp("alfworld_data")
    real = os.environ["ALFWORLD_DATA"]
    (data / "json_2.1.1").mkdir()
    (data / "json_2.1.1" / "valid_seen").symlink_to(f"{real}/json_2.1.1/valid_seen")
    with ScienceWorldEnv(task_names=SCIWORLD_TASKS, variations_per_task=1) as env:
        sci = [record_expert(env, task, "gold") for task in env.tasks("train")]
    with AlfWorldEnv() as env:
        alf = [record_expert(env, task, "observer") for task in env.tasks("valid_seen")[:2]]
        unseen = record_expert(env, env.tasks("valid_unseen")[0], "observer")
    originals = {"sciworld": [*sci, _altered(sci[0], 2)], "alfworld": [*alf, _altered(alf[1], 1), unseen]}
    store, out = Store(), {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ALFWORLD_DATA", str(data))
        for env_name, trajectories in originals.items():
            path = eto.write_eto(trajectories, tmp_path_factory.mktemp("eto") / f"{env_name}_eto.json", strip=True)
            written = datasets.import_eto(store, path, env_name, Lineage(asset="test"), open_env=resolve.open_env)
            out[env_name] = datasets.load_trajectories(store, written.ref.dataset, table="source_trajectories")
        yield originals, out, data


def test_stripped_export_names_no_task(imported, tmp_path):
    originals, _, _ = imported
    path = eto.write_eto(originals["sciworld"], tmp_path / "s.json", strip=True)
    records = json.loads(path.read_text())
    assert {key for r in records for key in r} == {"id", "conversations"}
    assert not any(t.task_id in json.dumps(r) for t, r in zip(originals["sciworld"], records))


@pytest.mark.parametrize("env_name", ["sciworld", "alfworld"])
def test_resolved_to_the_recorded_tasks_and_replayed(imported, env_name):
    originals, out, _ = imported
    resolved = out[env_name]
    faithful = len(originals[env_name]) - (2 if env_name == "alfworld" else 1)
    for original, t in zip(originals[env_name][:faithful], resolved[:faithful], strict=True):
        assert (t.task, t.task_id, t.split) == (original.task, original.task_id, original.split)
        assert (t.replay, t.diverged_at, t.source) == ("faithful", None, "eto") and replayable(t)
        assert t.reward == original.reward == 1.0  # stripped on export, the replay's score
    assert {t.resolution for t in resolved[:faithful]} <= {"description", "description+replay", "goal+observation",
                                                            "goal+observation+replay"}


def test_altered_observation_diverges_at_that_step(imported):
    originals, out, _ = imported
    sci, alf = out["sciworld"][-1], out["alfworld"][-2]
    assert (sci.task_id, sci.replay, sci.diverged_at) == (originals["sciworld"][0].task_id, "diverged", 2)
    assert (alf.task_id, alf.replay, alf.diverged_at) == (originals["alfworld"][1].task_id, "diverged", 1)
    assert not replayable(sci) and not replayable(alf)


def test_game_not_present_is_unmatched(imported):
    _, out, _ = imported
    t = out["alfworld"][-1]
    assert (t.resolution, t.replay, t.split) == ("unmatched", None, "train") and not replayable(t)
    assert resolve.counts(out["alfworld"]) == {"alfworld": {"matched": 3, "replayed": 2, "diverged": 1,
                                                            "unmatched": 1, "pending": 0}}
    summary = Store().sql("select env, matched, replayed, diverged, unmatched from resolution_summary order by env")
    assert summary.rows() == [("alfworld", 3, 2, 1, 1), ("sciworld", 3, 2, 1, 0)]


def test_normalise_documented_differences():
    assert resolve.normalise("You arrive at loc 12. On the desk 1,\n you see  a pen 1.") == \
        resolve.normalise("You arrive at desk 1. On the desk 1, you see a pen 1.")
    assert resolve.normalise("On the desk 1, you see a pen 1.") != resolve.normalise("On the desk 2, you see a pen 1.")


def test_sand_iteration_deliberates_over_imported_data(imported, home):
    """D_0 = the imported files only; iteration 1 deliberates over every step of the faithful trajectories
    (whatever their source) and over none of the others, which D_1 carries unchanged. The no-sampling ablation
    deliberates at every step, so what is deliberated does not hang on what the tiny model samples."""
    _, out, data = imported
    exp = Experiment(
        name="imported", base_model=str(tiny_model()), train_data={"alfworld": None, "sciworld": None},
        train=TrainConfig(lora=False, max_steps=2, per_device_batch_size=2, gradient_accumulation_steps=1,
                          max_length=1024, history_steps=4),
        # The agent's reply budget must hold a deliberation naming two candidates (nothing is evaluated here).
        evaluation=EvalConfig(pool_size=2, max_new_tokens=128, envs={
            "alfworld": EnvEval(splits=["valid_seen"], tasks_per_split=1, max_steps=3)}),
        sand=SandConfig(iterations=1, self_consistency=False, writer_max_new_tokens=16))
    model, loop = build_model_assets(exp), build_loop_assets(exp)
    base_model, d0, sft_checkpoint = model[:3]
    trained = {"finetuned_checkpoint", "evaluation", "control_checkpoint", "control_evaluation"}
    stages = [a for a in loop if not {k.path[-1] for k in a.keys} & trained]
    resources = {"store": StoreResource(home=str(home)), "sciworld": SciWorldResource(),
                 "alfworld": AlfWorldResource(), "compute": ComputeResource(torch_threads=1),
                 "pipes": PipesSubprocessClient()}
    with pytest.MonkeyPatch.context() as patch, instance_for_test() as instance:
        patch.setenv("ALFWORLD_DATA", str(data))
        result = materialize([expert_trajectories, *model, *loop], resources=resources, instance=instance,
                             selection=[expert_trajectories, base_model, d0, sft_checkpoint, *stages])
        assert result.success
        [expert] = [m for m in result.get_asset_materialization_events()
                    if m.asset_key == expert_trajectories.key]
        metadata = expert.materialization.metadata
        assert metadata["resolution/alfworld/replayed"].value == 2
        assert metadata["resolution/sciworld/diverged"].value == 1
    store = Store(home)
    faithful = [t for ts in out.values() for t in ts if t.replay == "faithful"]
    deliberated = store.sql("select trajectory_id, count(*) as n from deliberations where dataset = 'imported/iter_1' "
                            "group by all")
    assert dict(deliberated.rows()) == {t.id: len(t.steps) for t in faithful}
    d1 = {t.id: t for t in datasets.load_trajectories(store, "imported/iter_1")}
    others = [t for ts in out.values() for t in ts if t.replay != "faithful"]
    assert len(others) == 3 and all(d1[t.id] == t for t in others)


def test_rerun_step_resolves_pending_imports(imported, tmp_path):
    originals, _, _ = imported
    store = Store()
    path = eto.write_eto(originals["sciworld"][:1], tmp_path / "later.json", strip=True)
    path.write_text(path.read_text().replace('"sciworld_0"', '"later_0"'))  # ids are unique across sources
    pending = datasets.import_eto(store, path, "sciworld", Lineage(asset="test"))
    [t] = datasets.load_trajectories(store, pending.ref.dataset, table="source_trajectories")
    assert t.resolution == "pending" and not replayable(t)
    datasets.resolve_imports(store, resolve.open_env, Lineage(asset="test"), [pending.ref.dataset])
    [t] = datasets.load_trajectories(store, pending.ref.dataset, table="source_trajectories")
    assert (t.task_id, t.replay) == (originals["sciworld"][0].task_id, "faithful")
