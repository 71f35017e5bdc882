"""Environments in Ray worker processes, for the rollout engine's pool.

`ray_env_factory(make_env)` turns an environment factory into one whose environments each live in a
Ray actor (a process of its own, on any node of the cluster). The engine's threads then only wait on
remote calls while the steps run in parallel processes. ALFWorld gains the most: in one process its
engines share a parser behind a lock, so threads step it one at a time.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial

import ray
from ray.exceptions import RayActorError

from sand.envs.base import Environment, StepResult, TaskSpec

# What environments read their data locations from: workers see the driver's values, so on a
# cluster these must name storage every node mounts at the same path.
FORWARDED_VARIABLES = ("SAND_HOME", "ALFWORLD_DATA")


@ray.remote
class _EnvHost:
    """Holds one environment; the proxy calls it by method or attribute name."""

    def open(self, make_env: Callable[[], Environment]) -> tuple[str, tuple[str, ...]]:
        self.env = make_env()
        return self.env.name, self.env.SPLITS

    def call(self, method: str, *args):
        return getattr(self.env, method)(*args)

    def get(self, attribute: str):
        return getattr(self.env, attribute)


class RayEnvironment(Environment):
    """An Environment whose every call runs in the Ray actor hosting the real one.

    An exception raised there comes back from `ray.get` as a Ray error that is also an instance of the
    original class (a SandError is still caught as one) and carries the worker's traceback; a worker
    that died raises `ray.exceptions.RayActorError`.
    """

    def __init__(self, make_env: Callable[[], Environment], num_cpus: float, runtime_env: dict):
        # SPREAD: a pool of environments fills the cluster's nodes rather than the driver's.
        self._actor = _EnvHost.options(num_cpus=num_cpus, scheduling_strategy="SPREAD",
                                       runtime_env=runtime_env).remote()
        try:
            self.name, self.SPLITS = ray.get(self._actor.open.remote(make_env))
        except BaseException:
            ray.kill(self._actor)  # an actor whose environment failed to open must not hold its CPUs
            raise

    def _call(self, method: str, *args):
        return ray.get(self._actor.call.remote(method, *args))

    def tasks(self, split: str) -> list[TaskSpec]:
        return self._call("tasks", split)

    def reset(self, task: TaskSpec) -> str:
        return self._call("reset", task)

    def step(self, action: str) -> StepResult:
        return self._call("step", action)

    def admissible_actions(self) -> list[str]:
        return self._call("admissible_actions")

    @property
    def max_steps(self) -> int:
        return ray.get(self._actor.get.remote("max_steps"))

    @property
    def score(self) -> float:
        return ray.get(self._actor.get.remote("score"))

    def expert_actions(self, task: TaskSpec) -> list[str]:
        return self._call("expert_actions", task)

    def close(self) -> None:
        try:
            self._call("close")
        except RayActorError:
            pass  # the worker is gone, and its environment with it
        finally:
            ray.kill(self._actor)


def ray_env_factory(make_env: Callable[[], Environment], address: str | None = None,
                    num_cpus: float = 0.25) -> Callable[[], RayEnvironment]:
    """A zero-argument factory of environments made by `make_env` inside Ray actors, usable wherever
    an environment factory is (RolloutEngine, evaluate). `make_env` is shipped to the workers, so it
    must pickle (a class, a functools.partial, a closure over plain values).

    address: the Ray cluster ('auto', 'ray://head:10001', ...); None connects to RAY_ADDRESS if set,
    else starts a local Ray. Ignored when Ray is already initialised in this process.
    num_cpus: what each actor reserves. An environment works only between two generate calls, so a
    fraction of a core is its fair share; a pool needing more CPUs than the cluster has (or its
    autoscaler can add) leaves the extra environments waiting.
    """
    if not ray.is_initialized():
        ray.init(address=address)
    variables = {name: os.environ[name] for name in FORWARDED_VARIABLES if name in os.environ}
    return partial(RayEnvironment, make_env, num_cpus, {"env_vars": variables})
