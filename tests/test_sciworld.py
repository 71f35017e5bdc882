"""ScienceWorld with the real jar: one shared JVM for the module, short tasks only."""
import os
import subprocess

import pytest
from conftest import replay

from sand.envs.base import TaskSpec
from sand.envs.sciworld import ScienceWorldEnv
from sand.errors import SandError
from sand.experts import record_expert

TASKS = ["find-plant", "lifespan-longest-lived", "measure-melting-point-known-substance"]


def java_pids() -> set[int]:
    """The JVMs this process started (tests run in parallel: another worker's JVMs are not this test's)."""
    # pgrep exits 1 when no process matches.
    out = subprocess.run(["pgrep", "-x", "java", "-P", str(os.getpid())], check=False, capture_output=True,
                         text=True).stdout
    return {int(pid) for pid in out.split()}


def spec(task_id: str, split: str = "train") -> TaskSpec:
    return TaskSpec("sciworld", task_id.split(":")[0], task_id, split)


@pytest.fixture(scope="module")
def env():
    with ScienceWorldEnv(task_names=TASKS, variations_per_task=2) as env:
        yield env


def test_splits_are_disjoint_and_nonempty(env):
    by_split = {split: env.tasks(split) for split in env.SPLITS}
    for name in TASKS:
        ids = {split: {t.task_id for t in tasks if t.task == name} for split, tasks in by_split.items()}
        assert all(len(v) == 2 for v in ids.values())  # variations_per_task
        assert not (ids["train"] & ids["dev"] or ids["train"] & ids["test"] or ids["dev"] & ids["test"])
    assert env.tasks("train") == by_split["train"]  # stable order
    with pytest.raises(SandError, match="valid splits"):
        env.tasks("validation")


def test_reset_shows_goal_and_room(env):
    obs = env.reset(spec("find-plant:0"))
    assert obs.startswith("Your task is to find a(n) plant.")
    assert "This room is called the hallway." in obs
    assert env.score == 0.0 and env.max_steps >= 30


def test_unknown_action_is_invalid(env):
    env.reset(spec("find-plant:0"))
    result = env.step("fly to the moon")
    assert (result.valid, result.done, result.score) == (False, False, 0.0)
    assert result.observation == "No known action matches that input."
    assert env.step("look around").valid


def test_score_is_best_so_far_and_never_negative(env):
    env.reset(spec("find-plant:0"))
    env.step("open door to greenhouse")
    reached = env.step("go to greenhouse").score
    assert 0 < reached < 1
    failed = env.step("focus on air")  # focusing on the wrong thing fails the task (-100)
    assert failed.done and failed.score == reached == env.score


@pytest.mark.parametrize("task_id", ["find-plant:150", "lifespan-longest-lived:93"])
def test_gold_path_reaches_full_score(env, task_id):
    actions = env.expert_actions(spec(task_id))
    env.reset(spec(task_id))
    results = [env.step(a) for a in actions]
    assert results[-1].done and env.score == 1.0
    assert all(r.valid for r in results)


def test_replay_is_deterministic(env):
    # Without a constant JVM identity hash, rooms listed their contents in a new order on most resets.
    task = spec("measure-melting-point-known-substance:10")
    prefix = env.expert_actions(task)[:12]

    def observations():
        return [env.reset(task)] + [env.step(a).observation for a in prefix]

    first = observations()
    assert all(observations() == first for _ in range(3))
    assert replay(env, task, prefix) == replay(env, task, prefix)


def test_admissible_actions(env):
    env.reset(spec("find-plant:0"))
    actions = env.admissible_actions()
    assert "look around" in actions and "go to greenhouse" in actions


def test_record_expert(env):
    trajectory = record_expert(env, spec("find-plant:1"), "gold")
    assert trajectory.reward == 1.0
    assert trajectory.instruction.startswith("Your task is")
    assert trajectory.steps and all(s.action and s.observation for s in trajectory.steps)


def test_unknown_task_name_lists_valid_names_and_close_leaves_no_jvm():
    before = java_pids()
    with pytest.raises(SandError, match="boil"):
        ScienceWorldEnv(task_names=["boiling"])
    env = ScienceWorldEnv(task_names=["find-plant"])
    started = java_pids() - before
    assert started
    env.close()
    env.close()  # idempotent
    assert not started & java_pids()
