"""One interface over the text environments (ScienceWorld, ALFWorld).

An environment object holds one live episode at a time. `reset(task)` starts it; `step(action)`
advances it; `score` is the episode's normalised score in [0, 1] so far (ScienceWorld: the maximum
partial credit reached; ALFWorld: 1.0 once the goal holds). `replay(task, actions)` rebuilds the
state after an action prefix deterministically, which is what execution-guided critique needs.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from sand.errors import SandError


class EnvironmentFault(SandError):
    """The engine behind an environment died or stopped answering: the environment is unusable (throw it
    away with `abort()`), though the same task on a fresh one may well work."""


@dataclass(frozen=True)
class TaskSpec:
    """A task an episode can be reset to.

    env: "sciworld" or "alfworld"; task: the task type (ScienceWorld task name, ALFWorld task type);
    task_id: the locator, unique within the env (ScienceWorld "task_name:variation", ALFWorld the game
    folder path); split: the split it belongs to (see each environment's SPLITS).
    """

    env: str
    task: str
    task_id: str
    split: str


@dataclass(frozen=True)
class StepResult:
    observation: str
    score: float  # normalised episode score so far, in [0, 1]
    done: bool
    valid: bool  # False when the environment did not understand / could not apply the action


class Environment(ABC):
    """A text environment. Use as a context manager so the engine behind it is closed."""

    name: str
    SPLITS: tuple[str, ...]

    @abstractmethod
    def tasks(self, split: str) -> list[TaskSpec]:
        """Every task of a split, in a stable order."""

    @abstractmethod
    def reset(self, task: TaskSpec) -> str:
        """Start an episode; return the task goal and initial observation as the agent sees them."""

    @abstractmethod
    def step(self, action: str) -> StepResult: ...

    @abstractmethod
    def admissible_actions(self) -> list[str]:
        """Actions valid in the current state (may be costly; call only when needed)."""

    @property
    @abstractmethod
    def max_steps(self) -> int:
        """Step limit of the current task."""

    @property
    @abstractmethod
    def score(self) -> float: ...

    @abstractmethod
    def expert_actions(self, task: TaskSpec) -> list[str]:
        """An action sequence that solves the task (the expert demonstration)."""

    @abstractmethod
    def close(self) -> None: ...

    def abort(self) -> None:
        """Close an environment whose engine failed, without waiting on it."""
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
