"""Environment faults with real JVMs: a stopped (SIGSTOP) or killed (SIGKILL) ScienceWorld JVM is noticed
within its call deadline, replaced, and the episode started again; every episode is yielded exactly once;
a fault that persists fails naming the task; no JVM outlives the process that started it."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from sand.envs.base import EnvironmentFault, TaskSpec
from sand.envs.sciworld import ScienceWorldEnv
from sand.models import SamplingParams, tiny_model
from sand.models.backends import TransformersBackend
from sand.rollout import EpisodeRequest, RolloutEngine
from tests.conftest import REPO
from tests.test_rollout import scripted_model

torch.set_num_threads(1)
TASKS = ["find-plant"]
DEADLINE = 6.0  # seconds a call may take here: well above a warm step (~5 ms), even on a loaded machine


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child stays a zombie until reaped; it is gone all the same.
    return open(f"/proc/{pid}/stat").read().split()[2] != "Z"


class Envs:
    """make_env for the engine: fresh JVMs, the first `broken` of them prepared by `sabotage`."""

    def __init__(self, broken: list[ScienceWorldEnv] = ()):
        self.broken, self.made = list(broken), []

    def __call__(self) -> ScienceWorldEnv:
        env = self.broken.pop(0) if self.broken else ScienceWorldEnv(task_names=TASKS, variations_per_task=1,
                                                                      call_timeout_s=DEADLINE)
        self.made.append(env)
        return env


def warm_env() -> ScienceWorldEnv:
    env = ScienceWorldEnv(task_names=TASKS, variations_per_task=1, call_timeout_s=DEADLINE)
    env.reset(env.tasks("train")[0])  # the first load is slow; the calls under test are not
    return env


@pytest.fixture(scope="module")
def tasks():
    return [TaskSpec("sciworld", "find-plant", f"find-plant:{v}", "train") for v in (0, 1)]


@pytest.fixture(scope="module")
def tiny(home):
    with TransformersBackend(tiny_model(), dtype="float32") as backend:
        yield backend


@pytest.mark.parametrize("fault", [signal.SIGSTOP, signal.SIGKILL])
def test_stopped_or_killed_jvm_is_replaced_and_each_episode_yielded_once(home, tiny, tasks, fault):
    broken = warm_env()
    os.kill(broken._proc.pid, fault)
    envs = Envs([broken])
    start = time.monotonic()
    with RolloutEngine(tiny, envs, pool_size=1, params=SamplingParams(max_new_tokens=8)) as engine:
        results = list(engine.run([EpisodeRequest(t, max_agent_steps=1) for t in tasks]))
        # SIGSTOP: noticed at the call deadline, not hours later.
        assert time.monotonic() - start < 4 * DEADLINE + 60
        assert sorted(r.request.task.task_id for r in results) == sorted(t.task_id for t in tasks)
        assert all(r.done and len(r.steps) == 1 for r in results)
        assert not alive(broken._proc.pid)
        assert len(envs.made) == 2  # the broken one and its replacement, which ran both episodes
    assert not any(alive(e._proc.pid) for e in envs.made)


def test_a_jvm_stopped_mid_episode_restarts_the_episode(home, tasks):
    envs = Envs()
    ticks = []

    def stop_after_first_tick(tick):
        ticks.append(tick)
        if len(ticks) == 1:
            os.kill(envs.made[0]._proc.pid, signal.SIGSTOP)

    with TransformersBackend(scripted_model(home / "scripted"), dtype="float32") as backend, \
            RolloutEngine(backend, envs, pool_size=1, params=SamplingParams(max_new_tokens=24),
                          on_tick=stop_after_first_tick) as engine:
        results = list(engine.run([EpisodeRequest(tasks[0], max_agent_steps=3)]))
    assert len(results) == 1 and len(results[0].steps) == 3  # one full episode, from its second start
    assert all(s.action == "look around" for s in results[0].steps)
    assert len(envs.made) == 2 and not alive(envs.made[0]._proc.pid)


def test_a_fault_that_persists_names_the_task(home, tiny, tasks):
    env = warm_env()
    os.kill(env._proc.pid, signal.SIGKILL)
    with RolloutEngine(tiny, Envs([env]), pool_size=1, max_attempts=1) as engine:
        with pytest.raises(EnvironmentFault, match=rf"sciworld task '{tasks[0].task_id}'.*1 attempts.*JVM"):
            list(engine.run([EpisodeRequest(tasks[0], max_agent_steps=1)]))


def test_jvm_dies_with_the_process_that_started_it(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", (
        "from sand.envs.sciworld import ScienceWorldEnv; import sys, time\n"
        "env = ScienceWorldEnv(task_names=['find-plant'])\n"
        "print(env._proc.pid, flush=True); time.sleep(600)")], cwd=REPO, stdout=subprocess.PIPE, text=True)
    jvm = int(child.stdout.readline())
    assert alive(jvm)
    child.kill()
    child.wait()
    deadline = time.monotonic() + 15
    while alive(jvm) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(jvm)
