"""Environments in Ray actors, on a real local Ray (2 CPUs): the rollout engine plays the same episodes as
with in-process environments, errors come back as the environment raised them, and the compute resource
moves an asset's environments onto Ray."""
import time
from functools import partial

import pytest
import ray
import torch
from conftest import replay
from dagster import asset, materialize

from resources import AlfWorldResource, ComputeResource, SciWorldResource
from sand.distributed.ray_envs import RayEnvironment, ray_env_factory
from sand.envs.sciworld import ScienceWorldEnv
from sand.errors import SandError
from sand.evaluation import evaluate
from sand.models import SamplingParams, tiny_model
from sand.models.backends import TransformersBackend
from sand.rollout import EpisodeRequest, RolloutEngine
from sand.trajectory import Step
from sand_assets.common import env_factory

torch.set_num_threads(1)
SCI_TASKS = ["lifespan-longest-lived", "find-non-living-thing"]


@pytest.fixture(scope="module")
def cluster(home):
    """A local Ray started after SAND_HOME is set, so its workers inherit the test's environment."""
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(home):
    with TransformersBackend(tiny_model(), dtype="float32") as backend:
        yield backend


def wait_for_free_cpus(n: float, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < n:
        assert time.monotonic() < deadline, f"Ray CPUs not released: {ray.available_resources()}"
        time.sleep(0.2)


def test_engine_plays_the_same_episodes_with_ray_hosted_envs(home, cluster, tiny):
    make = partial(ScienceWorldEnv, task_names=SCI_TASKS)
    with make() as sci:
        tasks = sci.tasks("dev")[:3]
        gold = [sci.expert_actions(t) for t in tasks]

    def prefix(actions):
        return tuple(Step(f"t{j}", a, "") for j, a in enumerate(actions))

    # Replayed expert prefixes (partial credit, one full solution), a forced action the parser rejects,
    # then greedy agent steps: every path by which the engine steps an environment.
    requests = [EpisodeRequest(t, key=str(i), prefix=prefix(g[:len(g) // 2]), first_action="fly to the moon",
                               max_agent_steps=2) for i, (t, g) in enumerate(zip(tasks, gold))]
    requests.append(EpisodeRequest(tasks[0], key="solved", prefix=prefix(gold[0])))
    runs, made = [], []

    def tracked(factory):
        made.append(factory())
        return made[-1]

    for factory in (make, ray_env_factory(make)):
        with RolloutEngine(tiny, partial(tracked, factory), pool_size=2,
                           params=SamplingParams(max_new_tokens=16)) as engine:
            runs.append({r.request.key: r for r in engine.run(requests)})
    assert [type(env) for env in made] == [ScienceWorldEnv] * 2 + [RayEnvironment] * 2
    local, remote = runs
    assert local.keys() == {r.key for r in requests}
    assert local == remote  # steps, replies, rewards, counts and tokens of every episode
    assert local["solved"].reward == 1.0 and 0 < local["0"].reward < 1.0  # the episodes did move the envs
    wait_for_free_cpus(2)  # the engine closed its actors


def test_errors_in_the_worker_keep_their_type_and_free_the_actor(home, cluster):
    factory = ray_env_factory(partial(ScienceWorldEnv, task_names=SCI_TASKS))
    with factory() as env:
        assert (env.name, env.SPLITS) == ("sciworld", ScienceWorldEnv.SPLITS)
        with pytest.raises(SandError, match=r"call reset\(task\) first"):
            env.step("look around")
        with pytest.raises(SandError, match="unknown ScienceWorld split 'nope'"):
            env.tasks("nope")
        task = env.tasks("dev")[0]  # the environment survives its errors
        assert env.reset(task).startswith("Your task is") and env.max_steps > 0 and env.score == 0.0
        assert replay(env, task, env.expert_actions(task)).score == 1.0
        ray.kill(env._actor)  # the worker dies: calls say so, closing still works
        with pytest.raises(ray.exceptions.RayActorError):
            env.reset(task)
    # An environment that fails to open raises from the factory, and its actor gives its CPUs back.
    with pytest.raises(SandError, match="unknown ScienceWorld task names"):
        ray_env_factory(partial(ScienceWorldEnv, task_names=["no-such-task"]))()
    wait_for_free_cpus(2)


def test_compute_resource_puts_an_assets_environments_on_ray(home, cluster, tiny):
    """An asset making its environments through env_factory, as evaluations and critique rollouts do,
    with ALFWorld (games from ALFWORLD_DATA, read in the workers) and the resources' own settings."""
    seen = {}

    @asset
    def episodes(compute: ComputeResource, sciworld: SciWorldResource, alfworld: AlfWorldResource) -> None:
        factory = env_factory("alfworld", sciworld, alfworld, games_per_split=3)
        with factory() as env:
            tasks = env.tasks("valid_seen")
            env.reset(tasks[0])
            limit = env.max_steps
        seen[compute.env_workers] = type(env), limit, evaluate(tiny, factory, tasks, pool_size=2, max_steps=3,
                                                                max_new_tokens=16)

    for workers in ("local", "ray"):
        assert materialize([episodes], resources={
            "compute": ComputeResource(env_workers=workers), "sciworld": SciWorldResource(),
            "alfworld": AlfWorldResource(max_steps=7)}).success
    (local_type, local_limit, local), (ray_type, ray_limit, remote) = seen["local"], seen["ray"]
    assert local_type.__name__ == "AlfWorldEnv" and ray_type is RayEnvironment
    assert local_limit == ray_limit == 7  # the resource's own setting, rebuilt in the worker
    assert len(local) == 3 and local == remote
