"""ALFWorld behind `Environment`: the real TextWorld PDDL engine with ALFWorld's names and grammar.

Splits: `valid_seen` / `valid_unseen` are the evaluation games under `$ALFWORLD_DATA/json_2.1.1/<split>/`,
filtered as alfworld's `AlfredTWEnv` filters them; `train` and `heldout` are folders of games made by
`sand.envs.alfworld_gen` with different seeds (`heldout`: generated games never trained on, the
in-distribution test where a small model's success on real rooms is too rare to measure). A game is a
folder holding `game.tw-pddl` and `traj_data.json`; a task's `task_id` is that folder's path relative to
its split's root.
"""
from __future__ import annotations

import json
from pathlib import Path

import textworld

from sand import config
from sand.envs.alfworld_engine import (
    Engine,
    clean_intro,
    expert_cache_file,
    find_games,
    planner_walkthrough,
    run_observer,
    store_expert,
)
from sand.envs.alfworld_gen import generated_games
from sand.envs.base import Environment, EnvironmentFault, StepResult, TaskSpec
from sand.errors import SandError

EXPERTS = ("observer", "planner")
NOTHING = "Nothing happens."  # the engine's answer to an unknown or inapplicable command


class AlfWorldEnv(Environment):
    name = "alfworld"
    SPLITS = ("train", "heldout", "valid_seen", "valid_unseen", "real_train")
    # Real game folders under $ALFWORLD_DATA/json_2.1.1/ (`real_train`: ALFWorld's training games, where
    # ETO's ALFWorld trajectories were recorded; a full download has them, the copy beside the project not).
    _REAL_FOLDERS = {"valid_seen": "valid_seen", "valid_unseen": "valid_unseen", "real_train": "train"}

    def __init__(self, max_steps: int = 50, expert: str = "observer", games_per_split: int | None = None,
                 train_games_dir: str | Path | None = None, heldout_games_dir: str | Path | None = None,
                 pools: dict[str, tuple[int, int]] | None = None):
        """`pools` maps a generated split to the (games, seed) it was generated with: its tasks are exactly
        those games (the folder may hold more, made for a larger count). A generated split without a pool
        lists every game in its folder."""
        if expert not in EXPERTS:
            raise SandError(f"ALFWorld expert '{expert}' is unknown: use one of {', '.join(EXPERTS)}")
        self._max_steps = max_steps
        self.expert = expert
        self.games_per_split = games_per_split
        self.train_games_dir = Path(train_games_dir or config.cache_dir("alfworld", "train_games")).resolve()
        self.heldout_games_dir = Path(heldout_games_dir or config.cache_dir("alfworld", "heldout_games")).resolve()
        self._generated = {"train": self.train_games_dir, "heldout": self.heldout_games_dir}
        self._pools = pools or {}
        self._engine = Engine()
        self._expert_engines: dict[str, Engine] = {}  # separate engines keep the live episode intact
        self._state: textworld.GameState | None = None
        self._folder: Path | None = None  # the running game
        self._steps = 0
        self._won = False

    def split_root(self, split: str) -> Path:
        if split not in self.SPLITS:
            raise SandError(f"ALFWorld has no split '{split}': use one of {', '.join(self.SPLITS)}")
        return self._generated.get(split) or config.alfworld_data() / "json_2.1.1" / self._REAL_FOLDERS[split]

    def tasks(self, split: str) -> list[TaskSpec]:
        root = self.split_root(split)
        if split not in self._generated and not root.is_dir():
            raise SandError(f"ALFWorld games for '{split}' are missing: {root} does not exist "
                            "(point ALFWORLD_DATA at the folder holding json_2.1.1/)")
        if split in self._pools:
            games = sorted(generated_games(root, *self._pools[split]))  # find_games' order
        else:
            games = find_games(root) if root.is_dir() else []
        tasks = [TaskSpec(env=self.name, task=json.loads((g / "traj_data.json").read_text())["task_type"],
                          task_id=g.relative_to(root).as_posix(), split=split) for g in games]
        return tasks[: self.games_per_split]

    def game_dir(self, task: TaskSpec) -> Path:
        folder = self.split_root(task.split) / task.task_id
        if not (folder / "game.tw-pddl").is_file():
            raise SandError(f"ALFWorld game {folder}: no game.tw-pddl there")
        return folder

    def reset(self, task: TaskSpec) -> str:
        folder = self._folder = self.game_dir(task)
        self._state = self._engine.reset(folder, str(folder))
        self._steps, self._won = 0, bool(self._state["won"])
        return clean_intro(self._state.feedback)

    def step(self, action: str) -> StepResult:
        if self._state is None:
            raise SandError("ALFWorld: call reset(task) before step()")
        try:
            self._state = self._engine.step(action)
        except Exception as error:  # the engine's own failure, not the agent's: a fresh engine may do better
            raise EnvironmentFault(f"ALFWorld engine failed on {action!r} in game {self._folder}: {error!r}") \
                from error
        self._steps += 1
        self._won = self._won or bool(self._state["won"])
        done = self._won or self._steps >= self._max_steps
        return StepResult(self._state.feedback, self.score, done, self._state.feedback != NOTHING)

    def admissible_actions(self) -> list[str]:
        if self._state is None:
            raise SandError("ALFWorld: call reset(task) before admissible_actions()")
        return list(self._state["admissible_commands"])

    @property
    def max_steps(self) -> int:
        return self._max_steps

    @property
    def score(self) -> float:
        return 1.0 if self._won else 0.0

    def expert_actions(self, task: TaskSpec) -> list[str]:
        """The configured expert's actions, computed once per game and cached (planning can take
        minutes on a real game)."""
        folder = self.game_dir(task)
        cache = expert_cache_file(folder, self.expert)
        if cache.exists():
            return json.loads(cache.read_text())["actions"]
        engine = self._expert_engines.get(self.expert)
        if engine is None:
            engine = self._expert_engines[self.expert] = Engine(walkthrough=self.expert == "planner")
        if self.expert == "planner":
            actions = planner_walkthrough(engine, folder, str(folder))
        else:
            actions = run_observer(engine, folder, str(folder))[0]
        store_expert(folder, self.expert, actions)
        return actions

    def close(self) -> None:
        for engine in [self._engine, *self._expert_engines.values()]:
            engine.close()
        self._expert_engines.clear()
