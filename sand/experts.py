"""Expert trajectories: run an environment's expert actions and record the ReAct steps."""
from __future__ import annotations

from collections.abc import Callable, Iterable

from sand.envs.base import Environment, TaskSpec
from sand.trajectory import Step, Trajectory


def trajectory_id(task: TaskSpec, source: str) -> str:
    return f"{task.env}/{source}/{task.task_id}"


def record_expert(env: Environment, task: TaskSpec, source: str, actions: list[str] | None = None) -> Trajectory:
    """Execute the expert's actions for `task` in the real environment and record every turn.

    Thoughts are left empty: the base model writes them later. The reward is the score the
    environment gives at the end, so a broken expert shows up as a reward below 1.
    """
    actions = env.expert_actions(task) if actions is None else actions
    instruction = env.reset(task)
    steps = []
    for action in actions[: env.max_steps]:
        result = env.step(action)
        steps.append(Step(thought="", action=action, observation=result.observation))
        if result.done:
            break
    return Trajectory(
        id=trajectory_id(task, source), env=task.env, task=task.task, task_id=task.task_id, split=task.split,
        source=source, instruction=instruction, steps=steps, reward=env.score,
    )


def record_experts(env: Environment, tasks: Iterable[TaskSpec], source: str,
                   progress: Callable[[int, Trajectory], None] | None = None) -> list[Trajectory]:
    out = []
    for i, task in enumerate(tasks):
        out.append(record_expert(env, task, source))
        if progress:
            progress(i, out[-1])
    return out
