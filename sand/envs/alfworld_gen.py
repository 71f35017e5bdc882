"""Offline generator of ALFWorld training games, shaped exactly like the released game folders.

ALFWorld's own training games come from ALFRED scenes through a simulator we do not have. This
generator builds the same thing from PDDL: a room modelled on a real room type
(`alfworld_templates/rooms.json`), objects placed by ALFRED's placement rules, one of the six
task types with ALFWorld's goal (PDDL and sentence), ALFWorld's PDDL domain and grammar in the
classic wording. Every game is kept only once the observing expert has won it within 50 steps in the
real engine (which proves it solvable); its actions go to the expert cache on the way.

`rooms.json` is measured, not hand-written: `build_room_templates` derives it from the games of one
split, and it must be ALFWorld's valid_seen (whose rooms are those of ALFWorld's training set), never
valid_unseen, which would shape training data by the held-out evaluation. Rebuild it with
`python -m sand.envs.alfworld_gen --build-rooms`.
"""
from __future__ import annotations

import argparse
import functools
import json
import random
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sand import config
from sand.envs.alfworld_engine import (
    ALFRED_PDDL_PATH,
    ALFRED_TWL2_PATH,
    PLACEMENTS,
    TASK_TYPES,
    Engine,
    alfred,
    goal_library,
    run_observer,
    store_expert,
)
from sand.errors import SandError

ROOMS_FILE = Path(__file__).parent / "alfworld_templates" / "rooms.json"
_TEMPLATES = json.loads(ROOMS_FILE.read_text())
ROOMS: dict[str, dict] = _TEMPLATES["rooms"]
CAPACITY: dict[str, float] = _TEMPLATES["capacity"]
MAX_STEPS = 50  # the observer must win within ALFWorld's usual step limit
MAX_ATTEMPTS = 100

# The appliance each state-changing task needs, and the ALFRED property its object must have.
_APPLIANCE = {
    "pick_clean_then_place_in_recep": ("SinkBasin", "Cleanable"),
    "pick_heat_then_place_in_recep": ("Microwave", "Heatable"),
    "pick_cool_then_place_in_recep": ("Fridge", "Coolable"),
}
# ALFRED ids name a basin after its sink or tub ("Sink|x|y|z|SinkBasin"); the demangler then shows
# "sinkbasin" (an id starting with SinkBasin would show "sinkbasinbasin").
_BASIN_OWNER = {"SinkBasin": "Sink", "BathtubBasin": "Bathtub"}
_RECEPTACLE_TYPES = sorted(alfred.RECEPTACLES - alfred.MOVABLE_RECEPTACLES_SET)
_OBJECT_TYPES = sorted(alfred.OBJECTS_SET - set(_RECEPTACLE_TYPES))
_LIGHTS = alfred.VAL_ACTION_OBJECTS["Toggleable"]
# The object types a generated room holds: those with a place on some fixed receptacle (pickupable
# ones, and desk lamps, the light of look-at tasks).
_PLACEABLE = {o for o in _OBJECT_TYPES if any(o in PLACEMENTS.get(r, ()) for r in _RECEPTACLE_TYPES)}
# ALFRED numbers its scenes by room type: FloorPlan1-30 are kitchens, 201-230 living rooms, 301-330
# bedrooms, 401-430 bathrooms.
_ROOM_OF_SCENE = {0: "Kitchen", 2: "LivingRoom", 3: "Bedroom", 4: "Bathroom"}  # by scene number // 100

# The released games use the classic wording, which ALFWorld agents (and their papers) know: alfworld
# 0.4.2's grammar says "move X to Y" and names the receptacle on arrival, the games say
# "put X in/on Y" and "You arrive at loc N". Neither has 0.4.2's "help" action.
_CLASSIC_WORDING = [
    ('template :: "move {o} to {r}";', 'template :: "put {o} in/on {r}";'),
    ('"You move the {o.name} to the {r.name}."', '"You put the {o.name} in/on the {r.name}."'),
    ('"You arrive at {r.name}. #examineReceptacle.feedback#"',
     '"You arrive at {lend.name}. #examineReceptacle.feedback#"'),
]


def _cut(text: str, start: str, source: str) -> str:
    if start not in text:
        raise SandError(f"{source}: no '{start.strip()}' to remove; this alfworld version is not supported")
    return text[: text.index(start)]


@functools.cache
def classic_domain() -> str:
    """ALFWorld's PDDL domain without the "help" action."""
    return _cut(Path(ALFRED_PDDL_PATH).read_text(), "(:action help", ALFRED_PDDL_PATH).rstrip(" \n") + "\n\n\n)\n"


@functools.cache
def classic_grammar() -> str:
    """ALFWorld's grammar in the classic wording; the goal sentence is still "UNKNOWN GOAL"."""
    grammar = _cut(Path(ALFRED_TWL2_PATH).read_text(), "\naction help {", ALFRED_TWL2_PATH)
    for old, new in _CLASSIC_WORDING:
        if old not in grammar:
            raise SandError(f"{ALFRED_TWL2_PATH}: no '{old}' to reword; this alfworld version is not supported")
        grammar = grammar.replace(old, new)
    return grammar


def _pddl_name(alfred_id: str) -> str:
    """An ALFRED id spelled as the game files spell it (alfworld's PlannedGameState.fix_pddl_str_chars)."""
    for old, new in (("-", "_minus_"), ("|", "_bar_"), ("+", "_plus_"), (".", "_dot_"), (",", "_comma_")):
        alfred_id = alfred_id.replace(old, new)
    return alfred_id


def build_room_templates(split_root: Path) -> dict:
    """The content of rooms.json, measured on every game under `split_root` (a split folder).

    Per room type and per receptacle or object type: the share of the room's games that have the type,
    and the fewest and most of it a game has. Per receptacle type, the capacity: how many objects one
    receptacle of the type holds on average, counting one pseudo-object per type so that every type
    stays a possible place (an unseen Toaster would otherwise get weight 0 and could leave an object
    with nowhere to go). Unsolvable or unplayed games count too: their rooms are as real as the others.
    """
    if "unseen" in split_root.name:
        raise SandError(f"{split_root}: room templates must not come from the held-out unseen split")
    games: Counter[str] = Counter()
    counts: dict = defaultdict(lambda: {"receptacles": defaultdict(list), "objects": defaultdict(list)})
    instances: Counter[str] = Counter()
    held: Counter[str] = Counter()
    for game_file in sorted(split_root.rglob("game.tw-pddl")):
        scene = json.loads((game_file.parent / "traj_data.json").read_text())["scene"]["scene_num"]
        room = _ROOM_OF_SCENE[scene // 100]
        problem = json.loads(game_file.read_text())["pddl_problem"]
        init = problem[problem.index("(:init"):problem.index("(:goal")]  # the goal names ?variables
        receptacles = {r: t for r, t in re.findall(r"\(receptacleType (\S+) (\w+)Type\)", init)
                       if t in _RECEPTACLE_TYPES}
        objects = {o: t for o, t in re.findall(r"\(objectType (\S+) (\w+)Type\)", init) if t in _PLACEABLE}
        games[room] += 1
        for kind, types in (("receptacles", receptacles), ("objects", objects)):
            for t, n in Counter(types.values()).items():
                counts[room][kind][t].append(n)
        instances.update(receptacles.values())
        held.update(receptacles[r] for o, r in re.findall(r"\(inReceptacle (\S+) (\S+)\)", init)
                    if o in objects and r in receptacles)
    if not games:
        raise SandError(f"{split_root}: no ALFWorld games (game.tw-pddl) there")
    rooms = {room: {kind: {t: [round(len(n) / games[room], 2), min(n), statistics.median_low(n), max(n)]
                           for t, n in sorted(by_type.items(), key=lambda item: (-len(item[1]), item[0]))}
                    for kind, by_type in counts[room].items()}
             for room in sorted(games)}
    capacity = sorted(((t, round((held[t] + 1) / n, 2)) for t, n in instances.items()), key=lambda item: -item[1])
    comment = (f"Built by sand.envs.alfworld_gen.build_room_templates from the {sum(games.values())} games of "
               f"ALFWorld's {split_root.name} split only (never valid_unseen); rebuild with "
               "`python -m sand.envs.alfworld_gen --build-rooms`. In 'rooms', each receptacle or object type "
               "maps to [share of the room type's games that have it, min, median and max count]; object types "
               "are those with a place on a fixed receptacle in ALFRED's rules (desk lamps included). 'capacity' is "
               "how many objects one receptacle of a type holds on average in those games (plus one "
               "pseudo-object per type): the generator's weight for placing an object on it.")
    return {"comment": comment, "capacity": dict(capacity), "rooms": rooms}


def _sample_counts(rng: random.Random, spec: dict[str, list]) -> dict[str, int]:
    # Triangular around the median: real rooms are mostly typical, with a long tail of large ones.
    return {name: round(rng.triangular(low, high, mode)) for name, (p, low, mode, high) in spec.items()
            if rng.random() < p}


def _choose_task(rng: random.Random, task_type: str, receptacles: dict[str, int],
                 objects: dict[str, int]) -> tuple[str, str] | None:
    """(target object type, goal receptacle type) feasible in this room, or None.

    Feasible: the goal receptacle can hold the target and is not the task's appliance, and the target
    has another place to start from (so the goal does not hold at the start).
    """
    appliance, ability = _APPLIANCE.get(task_type, ("", ""))
    if appliance and appliance not in receptacles:
        return None
    places = {o: [r for r in receptacles if o in PLACEMENTS.get(r, ())] for o in objects}
    if task_type == "look_at_obj_in_light":
        if not places.get("DeskLamp"):
            return None
        targets = sorted(o for o in objects if o not in _LIGHTS and places[o])
        return (rng.choice(targets), "") if targets else None
    options = [(o, r) for o in sorted(objects) if o not in _LIGHTS
               and (not ability or o in alfred.VAL_ACTION_OBJECTS[ability])
               for r in places[o] if r != appliance and len(places[o]) > 1]
    return rng.choice(options) if options else None


def _sample_task(rng: random.Random, task_type: str) -> tuple[str, dict, dict, str, str]:
    """A room of a type the task suits (ALFRED's GOALS_VALID) and a feasible task in it:
    (room type, receptacle counts, object counts, target object type, goal receptacle type)."""
    room_type = rng.choice(sorted(alfred.GOALS_VALID[task_type]))
    room = ROOMS[room_type]
    while True:
        receptacles = _sample_counts(rng, room["receptacles"])
        objects = _sample_counts(rng, room["objects"])
        if task_type == "look_at_obj_in_light":
            objects["DeskLamp"] = 1
        task = _choose_task(rng, task_type, receptacles, objects)
        if task:
            break
    target, parent = task
    if task_type == "pick_two_obj_and_place":
        objects[target] = rng.randint(2, 3)
    return room_type, receptacles, objects, target, parent


@dataclass
class _Layout:
    receptacles: list[tuple[str, str, str]]  # (ALFRED id, type, location)
    objects: list[tuple[str, str, str, str]]  # (ALFRED id, type, receptacle id, location)
    start: str  # the agent's location, beside no receptacle: "You are in the middle of a room"


def _lay_out(rng: random.Random, receptacles: dict[str, int], objects: dict[str, int], target: str,
             parent: str) -> _Layout:
    """ALFRED-style ids and locations; each object goes to a receptacle that can hold it, at random
    weighted by the receptacle's capacity."""
    used: set[str] = set()

    def unique(make, *args) -> str:
        while (name := make(*args)) in used:
            pass
        used.add(name)
        return name

    def entity(kind: str, suffix: str = "") -> str:
        return f"{kind}|{rng.uniform(-5, 5):+06.2f}|{rng.uniform(0, 2):+06.2f}|{rng.uniform(-5, 5):+06.2f}{suffix}"

    def location() -> str:  # grid x, z, heading, camera pitch
        x, z, heading = rng.randint(-12, 12), rng.randint(-12, 12), rng.randint(0, 3)
        return f"loc|{x}|{z}|{heading}|{rng.choice((0, 15, 30, 45, 60))}"

    layout = _Layout([], [], "")
    for rtype, count in sorted(receptacles.items()):
        owner = _BASIN_OWNER.get(rtype)
        for _ in range(count):
            rid = unique(entity, owner, f"|{rtype}") if owner else unique(entity, rtype)
            layout.receptacles.append((rid, rtype, unique(location)))
    for otype, count in sorted(objects.items()):
        # The target never starts in a goal-type receptacle, or the goal could hold from the start.
        spots = [(rid, rtype, loc) for rid, rtype, loc in layout.receptacles
                 if otype in PLACEMENTS.get(rtype, ()) and not (otype == target and rtype == parent)]
        for _ in range(count if spots else 0):
            [(rid, _, loc)] = rng.choices(spots, weights=[CAPACITY[rtype] for _, rtype, _ in spots])
            layout.objects.append((unique(entity, otype), otype, rid, loc))
    layout.start = unique(location)
    return layout


def _problem(trial: str, task_type: str, layout: _Layout, names: dict[str, str]) -> str:
    """The PDDL problem, laid out as the released games' problems are."""
    receptacles, objects, n = layout.receptacles, layout.objects, _pddl_name
    rtypes = {t for _, t, _ in receptacles}
    otypes = {t for _, t, _, _ in objects}
    facts = [f"(receptacleType {n(r)} {t}Type)" for r, t, _ in receptacles]
    facts += [f"(objectType {n(o)} {t}Type)" for o, t, _, _ in objects]
    facts += [f"(canContain {r}Type {o}Type)" for r in sorted(rtypes) for o in sorted(otypes)
              if o in alfred.VAL_RECEPTACLE_OBJECTS.get(r, ())]
    facts += [f"(pickupable {n(o)})" for o, t, _, _ in objects if t not in _LIGHTS]
    facts += [f"(isReceptacleObject {n(o)})" for o, t, _, _ in objects if t in alfred.MOVABLE_RECEPTACLES_SET]
    facts += [f"(openable {n(r)})" for r, t, _ in receptacles if t in alfred.OPENABLE_CLASS_SET]
    facts.append(f"(atLocation agent1 {n(layout.start)})")
    for ability in ("Cleanable", "Heatable", "Coolable", "Sliceable"):
        able = alfred.VAL_ACTION_OBJECTS[ability]
        facts += [f"({ability.lower()} {n(o)})" for o, t, _, _ in objects if t in able]
    # As in the released games, only the task's light can be switched on.
    facts += [f"(toggleable {n(o)})" for o, t, _, _ in objects if t == names["toggle"]]
    facts += [f"(inReceptacle {n(o)} {n(r)})" for o, _, r, _ in objects]
    facts += [f"(receptacleAtLocation {n(r)} {n(loc)})" for r, _, loc in receptacles]
    facts += [f"(objectAtLocation {n(o)} {n(loc)})" for o, _, _, loc in objects]
    locations = sorted({loc for _, _, loc in receptacles} | {layout.start})
    # Every type is declared, as in the released games: the domain names some (SinkBasinType, ...).
    declarations = ["agent1 - agent", *(f"{t}Type - otype" for t in _OBJECT_TYPES),
                    *(f"{t}Type - rtype" for t in _RECEPTACLE_TYPES), *(f"{n(o)} - object" for o, *_ in objects),
                    *(f"{n(r)} - receptacle" for r, *_ in receptacles), *(f"{n(loc)} - location" for loc in locations)]
    goal = goal_library.gdict[task_type]["pddl"].format(**names).replace("#", "-")  # it also closes "(define"
    indent = "\n        "
    return (f"(define (problem plan_{trial})\n(:domain alfred)\n(:objects{indent}{indent.join(declarations)}{indent})\n"
            f"(:init{indent}{indent.join(facts)}{indent})\n{goal}")


def _sample_game(rng: random.Random, task_type: str, trial: str) -> tuple[dict, dict]:
    """A game (the game.tw-pddl content) and its traj_data.json content."""
    room_type, receptacles, objects, target, parent = _sample_task(rng, task_type)
    toggle = "DeskLamp" if task_type == "look_at_obj_in_light" else ""
    names = {"obj": target, "recep": parent, "toggle": toggle}
    layout = _lay_out(rng, receptacles, objects, target, parent)
    sentence = rng.choice(goal_library.gdict[task_type]["templates"]).format(**{k: v.lower() for k, v in names.items()})
    game = {"pddl_domain": classic_domain(), "grammar": classic_grammar().replace("UNKNOWN GOAL", sentence),
            "pddl_problem": _problem(trial, task_type, layout, names), "solvable": True}
    traj = {
        "task_id": trial, "task_type": task_type,
        "pddl_params": {"mrecep_target": "", "object_sliced": False, "object_target": target,
                        "parent_target": parent, "toggle_target": toggle},
        "turk_annotations": {"anns": [{"task_desc": sentence, "high_descs": [], "votes": []}]},
        "scene": {"room_type": room_type, "generator": __name__},
    }
    return game, traj


def generate_games(out_dir: str | Path, n: int, seed: int, task_types: Iterable[str] | None = None) -> list[Path]:
    """Make `n` games under `out_dir` (task types in turn) and return their folders.

    Deterministic in (seed, index, task type); games already there are kept, so a larger `n` later
    only adds games. A game folder is `<task_type>-<Object>-None-<Receptacle>-<Room>/trial_sand_s<seed>_<i>`.
    """
    task_types = tuple(task_types or TASK_TYPES)
    unknown = sorted(set(task_types) - set(TASK_TYPES))
    if unknown:
        raise SandError(f"ALFWorld task types {unknown} are unknown: use {', '.join(TASK_TYPES)}")
    out_dir = Path(out_dir)
    engine: Engine | None = None
    folders = []
    try:
        for i, (task_type, trial) in enumerate(_trials(n, seed, task_types)):
            existing = _existing_game(out_dir, task_type, trial)
            if existing is None:
                engine = engine or Engine()
                existing = _generate_one(out_dir, task_type, trial, random.Random(f"{seed}:{i}:{task_type}"), engine)
            folders.append(existing)
    finally:
        if engine is not None:
            engine.close()
    return folders


def generated_games(out_dir: str | Path, n: int, seed: int, task_types: Iterable[str] | None = None) -> list[Path]:
    """The folders of the first `n` games `generate_games` made for this seed (a folder may hold more,
    made for a larger `n`); raises if one is missing."""
    out_dir = Path(out_dir)
    folders = []
    for task_type, trial in _trials(n, seed, tuple(task_types or TASK_TYPES)):
        folder = _existing_game(out_dir, task_type, trial)
        if folder is None:
            raise SandError(f"{out_dir}: generated game {trial} ({task_type}) is missing: generate the games first")
        folders.append(folder)
    return folders


def _trials(n: int, seed: int, task_types: tuple[str, ...]) -> list[tuple[str, str]]:
    return [(task_types[i % len(task_types)], f"trial_sand_s{seed}_{i:05d}") for i in range(n)]


def _existing_game(out_dir: Path, task_type: str, trial: str) -> Path | None:
    existing = sorted(out_dir.glob(f"{task_type}-*/{trial}/traj_data.json"))
    return existing[0].parent if existing else None


def _generate_one(out_dir: Path, task_type: str, trial: str, rng: random.Random, engine: Engine) -> Path:
    """Sample games until the observer expert wins one within MAX_STEPS; write it and cache its actions.

    The observer's win proves the game solvable; the PDDL planner (seconds per game) runs only if
    an experiment asks for the planner expert."""
    for _ in range(MAX_ATTEMPTS):
        game, traj = _sample_game(rng, task_type, trial)
        observer, won = run_observer(engine, game, trial)
        if not won or len(observer) > MAX_STEPS:
            continue
        params = traj["pddl_params"]
        task_name = [task_type, params["object_target"], "None", params["parent_target"] or params["toggle_target"],
                     traj["scene"]["room_type"]]
        folder = out_dir / "-".join(task_name) / trial
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "game.tw-pddl").write_text(json.dumps(game))
        (folder / "traj_data.json").write_text(json.dumps(traj, indent=2))  # last: it marks the game complete
        store_expert(folder, "observer", observer)
        return folder
    raise SandError(f"ALFWorld generator: no {task_type} game for {out_dir / trial} after {MAX_ATTEMPTS} tries")


def _main() -> None:
    parser = argparse.ArgumentParser(prog="python -m sand.envs.alfworld_gen", description=__doc__.split("\n")[0])
    parser.add_argument("--build-rooms", metavar="SPLIT_DIR", nargs="?", const="", required=True,
                        help=f"rewrite {ROOMS_FILE.name} from the games under SPLIT_DIR "
                             "(default: $ALFWORLD_DATA/json_2.1.1/valid_seen)")
    split = Path(parser.parse_args().build_rooms or config.alfworld_data() / "json_2.1.1" / "valid_seen")
    text = json.dumps(build_room_templates(split), indent=2)
    # One line per [share, min, median, max], as a person would write it.
    ROOMS_FILE.write_text(re.sub(r"\[\s+([^][]*?)\s+\]", lambda m: f"[{' '.join(m.group(1).split())}]", text) + "\n")


if __name__ == "__main__":
    try:
        _main()
    except SandError as error:
        raise SystemExit(f"error: {error}") from None
