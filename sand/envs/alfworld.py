"""ALFWorld behind `Environment`: the real TextWorld PDDL engine with ALFWorld's names and grammar.

Splits: `valid_seen` / `valid_unseen` are the evaluation games under `$ALFWORLD_DATA/json_2.1.1/<split>/`,
filtered as alfworld's `AlfredTWEnv` filters them; `train` and `heldout` are folders of games made by
`sand.envs.alfworld_gen` with different seeds (`heldout`: generated games never trained on, the
in-distribution test where a small model's success on real rooms is too rare to measure). A game is a
folder holding `game.tw-pddl` and `traj_data.json`; a task's `task_id` is that folder's path relative to
its split's root.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sys
import threading
from pathlib import Path

import fast_downward
import textworld
from textworld.envs.pddl import PddlEnv

from sand import config
from sand.envs.alfworld_expert import ObserverExpert
from sand.envs.base import Environment, EnvironmentFault, StepResult, TaskSpec
from sand.errors import SandError


@contextlib.contextmanager
def _environ_kept(name: str):
    """Undo changes to os.environ[name] made inside the block."""
    before = os.environ.get(name)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


# Importing alfworld sets ALFWORLD_DATA to ~/.cache/alfworld when it is unset (alfworld/info.py), which
# would hide a missing setting from sand.config.alfworld_data(). Other modules take alfworld from here
# (alfworld_gen uses the goal library and the wheel's domain and grammar files).
with _environ_kept("ALFWORLD_DATA"):
    import alfworld.gen.constants as alfred
    from alfworld.agents.environment.alfred_tw_env import TASK_TYPES as _ALFRED_TASK_TYPES
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler
    from alfworld.gen import goal_library  # noqa: F401
    from alfworld.info import ALFRED_PDDL_PATH, ALFRED_TWL2_PATH  # noqa: F401

# Translating PDDL to SAS is most of a reset's cost (twice per reset, up to ~1 s for a real kitchen)
# and depends only on the domain and problem text, which a game keeps: translate each game once per
# process. TextWorld's PddlState calls fast_downward.pddl2sas and only reads the translated task.
fast_downward.pddl2sas = functools.lru_cache(maxsize=32)(fast_downward.pddl2sas)

# TextWorld parses commands and PDDL with module-level tatsu parsers, and the translator swaps sys.argv and
# sys.stdout: engines driven from several threads (the rollout engine) crash or corrupt each other. They take
# turns; the work is mostly Python holding the GIL, so little parallelism is lost.
_ENGINE_LOCK = threading.Lock()

TASK_TYPES = tuple(_ALFRED_TASK_TYPES.values())  # the six types AlfredTWEnv plays by default
EXPERTS = ("observer", "planner")
NOTHING = "Nothing happens."  # the engine's answer to an unknown or inapplicable command
OBSERVER_STEP_CAP = 200  # the observer stops by itself once it has seen every receptacle

# Where each object type can be: ALFRED's placement rules, plus desk lamps, which the rules leave
# out and which stand on desks, side tables and dressers in the real games.
PLACEMENTS: dict[str, frozenset[str]] = {
    rtype: frozenset(objs) | ({"DeskLamp"} if rtype in ("Desk", "SideTable", "Dresser") else set())
    for rtype, objs in alfred.VAL_RECEPTACLE_OBJECTS.items()
}
_CAN_CONTAIN = {r.lower(): frozenset(o.lower() for o in objs) for r, objs in PLACEMENTS.items()}


def find_games(root: Path) -> list[Path]:
    """Game folders under `root` that AlfredTWEnv would load, in a stable order.

    Like AlfredTWEnv: skip movable-receptacle and sliced-object trajectories, task types other than
    the six, folders without `game.tw-pddl`, and games not marked `solvable` (they crash the loader).
    """
    games = []
    for traj_file in sorted(root.rglob("traj_data.json")):
        folder = traj_file.parent
        relative = folder.relative_to(root).as_posix()
        if "movable" in relative or "Sliced" in relative:
            continue
        if json.loads(traj_file.read_text())["task_type"] not in TASK_TYPES:
            continue
        game_file = folder / "game.tw-pddl"
        if game_file.exists() and json.loads(game_file.read_text()).get("solvable"):
            games.append(folder)
    return games


def clean_intro(text: str) -> str:
    """The intro as ALFWorld agents see it: without the banner, the two paragraphs on two lines."""
    return "\n".join(text.split("\n\n")[1:])


@contextlib.contextmanager
def _argv_kept():
    """fast_downward's PDDL translator overwrites sys.argv (its own "HACK"); put it back."""
    argv = list(sys.argv)
    try:
        yield
    finally:
        sys.argv[:] = argv


class Engine:
    """One TextWorld PddlEnv with ALFWorld's name demangler, as AlfredTWEnv wraps it.

    Each engine loads its own copy of fast-downward's library, so several can live in one process.
    A game folder is loaded once and then reset as often as needed.
    """

    def __init__(self, walkthrough: bool = False):
        infos = textworld.EnvInfos(won=True, admissible_commands=True,
                                   extras=["walkthrough"] if walkthrough else [])
        self._env: AlfredDemangler | None = AlfredDemangler(PddlEnv(infos))
        self._loaded: str | None = None

    def reset(self, game: Path | dict, name: str) -> textworld.GameState:
        """Start `game` (a game folder, or the game.tw-pddl content); `name` identifies it in errors."""
        try:
            with _ENGINE_LOCK, _argv_kept():
                key = str(game) if isinstance(game, Path) else None
                if key is None or key != self._loaded:
                    self._loaded = None
                    self._env.load(str(game / "game.tw-pddl") if isinstance(game, Path) else game)
                    self._loaded = key
                return self._env.reset()
        except Exception as error:
            raise SandError(f"ALFWorld game {name}: the engine cannot load it ({error!r})") from error

    def step(self, command: str) -> textworld.GameState:
        with _ENGINE_LOCK:
            return self._env.step(command)[0]

    def close(self) -> None:
        """Free the planner's memory. The library copy stays mapped: unloading several copies
        (fast_downward.close_lib) crashes the process at exit."""
        if self._env is not None:
            self._env._wrapped_env.downward_lib.cleanup()
            self._env = None


def run_observer(engine: Engine, game: Path | dict, name: str) -> tuple[list[str], bool]:
    """Play `game` with the observing expert; return its actions and whether it won."""
    state = engine.reset(game, name)
    observation = clean_intro(state.feedback)
    try:
        expert = ObserverExpert(observation, _CAN_CONTAIN)
    except ValueError as error:
        raise SandError(f"ALFWorld game {name}: the observing expert cannot read its goal ({error})") from error
    actions: list[str] = []
    while not state["won"] and len(actions) < OBSERVER_STEP_CAP:
        action = expert.act(observation, state["admissible_commands"])
        if action is None:
            break
        state = engine.step(action)
        observation = state.feedback
        actions.append(action)
    return actions, bool(state["won"])


def planner_walkthrough(engine: Engine, game: Path | dict, name: str) -> list[str]:
    """The PDDL planner's walkthrough (`engine` must be made with walkthrough=True); [] if none."""
    return list(engine.reset(game, name)["extra.walkthrough"])


def expert_cache_file(game_dir: Path, kind: str) -> Path:
    """Where the `kind` expert's actions for a game are cached: keyed by the game file's content."""
    digest = hashlib.sha256((game_dir / "game.tw-pddl").read_bytes()).hexdigest()[:24]
    return config.cache_dir("alfworld", "experts") / f"{kind}-{digest}.json"


def store_expert(game_dir: Path, kind: str, actions: list[str]) -> None:
    path = expert_cache_file(game_dir, kind)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"game": str(game_dir), "expert": kind, "actions": actions}))
    tmp.replace(path)


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
            from sand.envs.alfworld_gen import generated_games

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
