"""The ALFWorld pieces that the environment (sand.envs.alfworld) and the game generator (sand.envs.alfworld_gen)
share: alfworld's library (imported here only), TextWorld's PDDL engine as ALFWorld wraps it, the observing
expert's runner and the expert cache."""
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
# would hide a missing setting from sand.config.alfworld_data(). The game generator takes alfworld from here
# (the goal library and the wheel's domain and grammar files).
with _environ_kept("ALFWORLD_DATA"):
    import alfworld.gen.constants as alfred
    from alfworld.agents.environment.alfred_tw_env import TASK_TYPES as _ALFRED_TASK_TYPES
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler
    from alfworld.gen import goal_library  # noqa: F401
    from alfworld.info import ALFRED_PDDL_PATH, ALFRED_TWL2_PATH  # noqa: F401


@functools.cache
def _translate_each_game_once() -> None:
    """Translating PDDL to SAS is most of a reset's cost (twice per reset, up to ~1 s for a real kitchen) and
    depends only on the domain and problem text, which a game keeps: cache the translator (TextWorld's PddlState
    calls fast_downward.pddl2sas and only reads the translated task). Installed by the first engine made."""
    fast_downward.pddl2sas = functools.lru_cache(maxsize=32)(fast_downward.pddl2sas)


# TextWorld parses commands and PDDL with module-level tatsu parsers, and the translator swaps sys.argv and
# sys.stdout: engines driven from several threads (the rollout engine) crash or corrupt each other. They take
# turns; the work is mostly Python holding the GIL, so little parallelism is lost.
_ENGINE_LOCK = threading.Lock()

TASK_TYPES = tuple(_ALFRED_TASK_TYPES.values())  # the six types AlfredTWEnv plays by default
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
        _translate_each_game_once()
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

