"""Imported trajectories: which environment task each was recorded in, and whether it replays there.

ETO-style data names no task: a trajectory is an instruction and its steps. The instruction identifies
the task (`resolve`):
- ScienceWorld: the task description ("Your task is to ...") is looked up among the descriptions of every
  variation of every task and split, which the simulator enumerates without building a world; among
  variations that share a description, those that open differently (the room as `look around` shows it: the
  rest of the instruction, or the first step's observation when that step is `look around`) are left out.
- ALFWorld: the goal sentence is looked up among the goals of the games of every split the environment
  has (the real splits under ALFWORLD_DATA and the generated games); games that share it must open with
  the same room (its receptacle list), which costs one reset per game and is cached.
When several candidates remain, they are replayed in turn and the first the trajectory replays in
faithfully wins ("+replay" in the recorded `resolution`).

A match is then verified by replay (`verify`): the actions are executed in the matched task and every
observation is compared with the recorded one, normalised (`normalise`) for the differences that do not
change what an agent learns: whitespace (ETO's files and the environments' servers break and indent lines
differently), and ALFWorld's arrival sentence, which the classic game files word "You arrive at loc 12."
and newer grammars "You arrive at cabinet 1.". A trajectory that replays faithfully is replayable: the loop
deliberates over it like one recorded here. One that diverges is kept for training, with the first step
whose observation differs (`diverged_at`, numbered like the `steps` view).

Fields set on a trajectory: `task`, `task_id`, `split` (the matched task), `resolution` (how it matched,
"unmatched", or "pending" for an import not resolved yet), `replay` ("faithful" / "diverged"),
`diverged_at`; a faithful replay without a recorded reward gets the environment's final score.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterable
from importlib.metadata import version
from pathlib import Path

from sand import config
from sand.envs.base import Environment, TaskSpec
from sand.errors import SandError
from sand.trajectory import Trajectory
from sand.versioning import code_version

_logger = logging.getLogger(__name__)

UNMATCHED = "unmatched"
PENDING = "pending"  # imported without resolution: trained on, never deliberated, until resolved
FAITHFUL, DIVERGED = "faithful", "diverged"

_WHITESPACE = re.compile(r"\s+")
# ALFWorld's arrival sentence: "You arrive at loc 12." (classic game files) or "You arrive at cabinet 1.".
_ARRIVAL = re.compile(r"\bYou arrive at (?:loc \d+|[a-z]+ \d+)\.")
_SCIWORLD_TASK = re.compile(r"Your task is to\b.*?(?=\n\s*\n|\Z)", re.DOTALL)
_ALFWORLD_ROOM = re.compile(r"You are in the middle of a room\..*?(?=Your task is to:|\Z)", re.DOTALL)
_ALFWORLD_GOAL = re.compile(r"Your task is to:\s*(.*?)\s*$", re.DOTALL)
# Splits tried first when candidates tie: ETO's expert data comes from the training splits.
_SPLIT_ORDER = ("train", "alfred_train", "dev", "valid_seen", "heldout", "test", "valid_unseen")


def normalise(text: str) -> str:
    """An observation with the documented wording differences removed (see the module docstring)."""
    return _WHITESPACE.sub(" ", _ARRIVAL.sub("You arrive.", text)).strip()


def _split_rank(split: str) -> int:
    return _SPLIT_ORDER.index(split) if split in _SPLIT_ORDER else len(_SPLIT_ORDER)


def _cached_json(name: str, build: Callable[[], object]) -> object:
    """A JSON file under SAND_HOME/cache/resolve, built once; `name` carries everything it depends on."""
    path = config.cache_dir("resolve") / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    value = build()
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)
    return value


# --- ScienceWorld ---------------------------------------------------------------------------------------

def sciworld_index(env) -> dict[str, list[list[str]]]:
    """Normalised task description -> [[task_id, split], ...] over every variation of every task and split.
    Cached per scienceworld version (the descriptions are the jar's) and this module's code."""
    def build() -> dict[str, list[list[str]]]:
        index: dict[str, list[list[str]]] = {}
        maker = env._server.taskMaker()
        for name in env._server.getTaskNames():
            task = maker.getTask(name).get()
            for split, variations in env._splits(name).items():
                for v in variations:
                    description = normalise(task.setupGoals(v).description())
                    index.setdefault(description, []).append([f"{name}:{v}", split])
        return index

    return _cached_json(f"sciworld-{version('scienceworld')}-{code_version('sand.formats.resolve')}", build)


def _sciworld_opening(trajectory: Trajectory) -> tuple[str, str]:
    """(task description, opening observation) of a ScienceWorld instruction; the opening is '' when the
    trajectory does not record it."""
    text = trajectory.instruction
    found = _SCIWORLD_TASK.search(text)
    description = found.group(0) if found else text.split("\n\n")[0]
    opening = text[found.end():] if found else ""
    if not opening.strip() and trajectory.steps and normalise(trajectory.steps[0].action) == "look around":
        opening = trajectory.steps[0].observation
    return normalise(description), normalise(opening)


# --- ALFWorld -------------------------------------------------------------------------------------------

def _game_goal(game_file: Path) -> str:
    grammar = json.loads(game_file.read_text())["grammar"]
    found = re.search(r"Your task is to:\s*([^\"\\]*)", grammar)
    return normalise(found.group(1)).rstrip(".") if found else ""


def alfworld_index(env) -> dict[str, list[list[str]]]:
    """Normalised goal sentence -> [[split, task_id, task type, game digest], ...] over the games of every split the
    environment has. Cached, keyed on the games' files (names, sizes, modification times) and this code."""
    from sand.envs.alfworld import find_games

    roots = {}
    for split in env.SPLITS:
        try:
            roots[split] = env.split_root(split)
        except SandError:  # no ALFWORLD_DATA: the generated games are still searched
            continue
    roots = {split: root for split, root in roots.items() if root.is_dir()}
    key = hashlib.sha256(code_version("sand.formats.resolve", "sand.envs.alfworld").encode())
    for split, root in sorted(roots.items()):
        key.update(f"{split}\0{root}\0".encode())
        for path in sorted(root.rglob("*")):
            if path.name in ("game.tw-pddl", "traj_data.json"):
                stat = path.stat()
                key.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())

    def build() -> dict[str, list[list[str]]]:
        index: dict[str, list[list[str]]] = {}
        for split, root in sorted(roots.items()):
            for game in find_games(root):
                data = (game / "game.tw-pddl").read_bytes()
                task_type = json.loads((game / "traj_data.json").read_text())["task_type"]
                index.setdefault(_game_goal(game / "game.tw-pddl"), []).append(
                    [split, game.relative_to(root).as_posix(), task_type, hashlib.sha256(data).hexdigest()[:24]])
        return index

    return _cached_json(f"alfworld-{key.hexdigest()[:24]}", build)


def _alfworld_opening(text: str) -> tuple[str, str]:
    """(goal sentence, room description) of an ALFWorld instruction, normalised."""
    goal = _ALFWORLD_GOAL.search(text)
    room = _ALFWORLD_ROOM.search(text)
    return (normalise(goal.group(1)).rstrip(".") if goal else "", normalise(room.group(0)) if room else "")


# --- resolution and replay ------------------------------------------------------------------------------

@dataclasses.dataclass
class Replay:
    faithful: bool
    diverged_at: int | None  # first step whose observation differs
    score: float


class _Resolver:
    """Matches one environment's trajectories: `candidates` lists the tasks whose description fits, each is
    replayed (in `_SPLIT_ORDER`) until one is faithful; with none, the one that diverged latest is kept."""

    def __init__(self, env: Environment):
        self.env = env

    def candidates(self, trajectory: Trajectory) -> tuple[list[TaskSpec], str]:
        raise NotImplementedError

    def opening(self, start: str) -> str:
        """The normalised opening observation in what `reset` returns ('' when candidates never differ there)."""
        return ""

    def verify(self, task: TaskSpec, trajectory: Trajectory, opening: str) -> Replay | None:
        """Replay the trajectory's actions in `task`, comparing each observation, normalised. None when the
        recorded `opening` is given and the task opens differently (one reset, no steps)."""
        start = self.env.reset(task)
        if opening and self.opening(start) != opening:
            return None
        for i, step in enumerate(trajectory.steps):
            if normalise(self.env.step(step.action).observation) != normalise(step.observation):
                return Replay(False, i, self.env.score)
        return Replay(True, None, self.env.score)

    def resolve(self, trajectory: Trajectory) -> Trajectory:
        tasks, how, opening = self.candidates(trajectory)
        replays: list[tuple[TaskSpec, Replay]] = []
        for task in sorted(tasks, key=lambda t: (_split_rank(t.split), t.task_id)):
            replay = self.verify(task, trajectory, opening)
            if replay is not None:
                replays.append((task, replay))
                if replay.faithful:
                    break
        if not replays:
            return dataclasses.replace(trajectory, resolution=UNMATCHED, replay=None, diverged_at=None)
        task, replay = replays[-1] if replays[-1][1].faithful else max(replays, key=lambda r: r[1].diverged_at)
        reward = trajectory.reward if trajectory.reward is not None or not replay.faithful else replay.score
        return dataclasses.replace(trajectory, task=task.task, task_id=task.task_id, split=task.split,
                                   resolution=how + ("+replay" if len(tasks) > 1 else ""),
                                   replay=FAITHFUL if replay.faithful else DIVERGED,
                                   diverged_at=replay.diverged_at, reward=reward)


class _SciWorldResolver(_Resolver):
    def __init__(self, env):
        super().__init__(env)
        self.index = sciworld_index(env)

    def opening(self, start: str) -> str:
        return normalise(start.split("\n\n", 1)[-1])

    def candidates(self, trajectory):
        description, opening = _sciworld_opening(trajectory)
        tasks = [TaskSpec("sciworld", tid.rpartition(":")[0], tid, split)
                 for tid, split in self.index.get(description, [])]
        return tasks, "description", opening if len(tasks) > 1 else ""


class _AlfWorldResolver(_Resolver):
    def __init__(self, env):
        super().__init__(env)
        try:
            train = env.split_root("real_train")
        except SandError as exc:
            train = exc
        if not isinstance(train, Path) or not train.is_dir():
            _logger.warning(f"ALFWorld's training games are not here ({train}): trajectories recorded in them, as "
                            "ETO's ALFWorld data is, will be unmatched (trained on, never deliberated over). "
                            "`alfworld-download` places them in $ALFWORLD_DATA/json_2.1.1/train.")
        self.index = alfworld_index(env)
        self._rooms = config.cache_dir("resolve", f"alfworld-rooms-{version('textworld')}-{version('alfworld')}-"
                                                  f"{code_version('sand.envs.alfworld')}")

    def _room(self, task: TaskSpec, digest: str) -> str:
        """The room description a game opens with: one reset per game (seconds for a real one), cached by the
        game file's content."""
        path = self._rooms / f"{digest}.txt"
        if not path.exists():
            path.write_text(_alfworld_opening(self.env.reset(task))[1])
        return path.read_text()

    def candidates(self, trajectory):
        goal, room = _alfworld_opening(trajectory.instruction)
        tasks = [TaskSpec("alfworld", task_type, task_id, split)
                 for split, task_id, task_type, digest in self.index.get(goal, [])
                 if self._room(TaskSpec("alfworld", task_type, task_id, split), digest) == room]
        return tasks, "goal+observation", ""


RESOLVERS = {"sciworld": _SciWorldResolver, "alfworld": _AlfWorldResolver}


def resolve(trajectories: Iterable[Trajectory], open_env: Callable[[str], Environment],
            progress: Callable[[int, Trajectory], None] | None = None) -> list[Trajectory]:
    """Every trajectory with its task matched and its replay verified (see the module docstring), in order.
    `open_env(name)` makes an environment of that name; one is opened per environment present."""
    trajectories = list(trajectories)
    out: list[Trajectory | None] = [None] * len(trajectories)
    done = 0
    for name in sorted({t.env for t in trajectories}):
        with open_env(name) as env:
            resolver = RESOLVERS[name](env)
            for i, t in enumerate(trajectories):
                if t.env == name:
                    out[i] = resolver.resolve(t)
                    if progress:
                        progress(done, out[i])
                    done += 1
    return out


def pending(trajectories: Iterable[Trajectory]) -> list[Trajectory]:
    """Imported trajectories marked as not resolved yet."""
    return [dataclasses.replace(t, resolution=PENDING, replay=None, diverged_at=None) for t in trajectories]


def counts(trajectories: Iterable[Trajectory]) -> dict[str, dict[str, int]]:
    """Per environment, over imported trajectories: matched to a task, replayed faithfully, diverged,
    unmatched, pending."""
    out: dict[str, dict[str, int]] = {}
    for t in trajectories:
        if t.resolution is None:
            continue
        c = out.setdefault(t.env, {"matched": 0, "replayed": 0, "diverged": 0, "unmatched": 0, "pending": 0})
        c[t.resolution if t.resolution in (UNMATCHED, PENDING) else "matched"] += 1
        c["replayed"] += t.replay == FAITHFUL
        c["diverged"] += t.replay == DIVERGED
    return out



def open_env(name: str) -> Environment:
    """The environments resolution searches by default: ScienceWorld (easy simplifications, as ETO's data)
    and ALFWorld's splits (ALFWORLD_DATA and the engine's generated-game folders)."""
    from sand.envs.alfworld import AlfWorldEnv
    from sand.envs.sciworld import ScienceWorldEnv

    return ScienceWorldEnv() if name == "sciworld" else AlfWorldEnv()
