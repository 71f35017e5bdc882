"""An ALFWorld expert that acts only on what it has observed, so a policy can imitate it.

The PDDL planner's walkthrough is omniscient: it walks straight to a hidden object. This expert
knows only the task sentence, the receptacles the intro lists, the observations so far and the
game's admissible commands. It searches receptacles in a sensible order (types that can hold the
target first, open surfaces before closed containers), opens closed ones, remembers what it saw,
takes the target, uses the appliance the task needs, and puts the object in/on the goal receptacle.
It is deterministic: the same game always gives the same actions.
"""
from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

# ALFWorld's goal sentences (alfworld/gen/goal_library.py), most specific first.
_GOAL_PATTERNS = [
    (r"put a clean (?P<obj>\w+) in (?P<recep>\w+)", "pick_clean_then_place_in_recep"),
    (r"clean some (?P<obj>\w+) and put it in (?P<recep>\w+)", "pick_clean_then_place_in_recep"),
    (r"put a hot (?P<obj>\w+) in (?P<recep>\w+)", "pick_heat_then_place_in_recep"),
    (r"heat some (?P<obj>\w+) and put it in (?P<recep>\w+)", "pick_heat_then_place_in_recep"),
    (r"put a cool (?P<obj>\w+) in (?P<recep>\w+)", "pick_cool_then_place_in_recep"),
    (r"cool some (?P<obj>\w+) and put it in (?P<recep>\w+)", "pick_cool_then_place_in_recep"),
    (r"put two (?P<obj>\w+) in (?P<recep>\w+)", "pick_two_obj_and_place"),
    (r"find two (?P<obj>\w+) and put them in (?P<recep>\w+)", "pick_two_obj_and_place"),
    (r"look at (?P<obj>\w+) under the (?P<toggle>\w+)", "look_at_obj_in_light"),
    (r"examine the (?P<obj>\w+) with the (?P<toggle>\w+)", "look_at_obj_in_light"),
    (r"put a (?P<obj>\w+) in (?P<recep>\w+)", "pick_and_place_simple"),
    (r"put some (?P<obj>\w+) on (?P<recep>\w+)", "pick_and_place_simple"),
]

# Appliance receptacle type and command verb of the tasks that change the object's state.
_APPLIANCES = {
    "pick_clean_then_place_in_recep": ("sinkbasin", "clean"),
    "pick_heat_then_place_in_recep": ("microwave", "heat"),
    "pick_cool_then_place_in_recep": ("fridge", "cool"),
}

# Where to look first: open surfaces cost one step to inspect, closed containers two (go + open).
SEARCH_ORDER = (
    "countertop", "diningtable", "coffeetable", "sidetable", "desk", "dresser", "shelf", "bed", "sofa",
    "armchair", "ottoman", "tvstand", "cart", "toilet", "sinkbasin", "bathtubbasin", "stoveburner",
    "coffeemachine", "toaster", "handtowelholder", "towelholder", "toiletpaperhanger", "laundryhamper",
    "garbagecan", "fridge", "microwave", "cabinet", "drawer", "safe",
)

_NAME = r"[a-z]+ \d+"  # a demangled entity name: "cabinet 3", "apple 1"


@dataclass(frozen=True)
class Goal:
    task_type: str
    obj: str  # object type as the game names it, e.g. "apple"
    recep: str = ""  # goal receptacle type, e.g. "countertop" ("" for look_at_obj_in_light)
    toggle: str = ""  # light to use, e.g. "desklamp" (look_at_obj_in_light only)


def parse_goal(text: str) -> Goal:
    """The goal of the "Your task is to: ..." sentence in `text`."""
    sentence = text.split("Your task is to:", 1)[-1].strip().rstrip(".")
    for pattern, task_type in _GOAL_PATTERNS:
        match = re.fullmatch(pattern, sentence)
        if match:
            return Goal(task_type, **match.groupdict())
    raise ValueError(f"not an ALFWorld goal sentence: {sentence!r}")


def entity_type(name: str) -> str:
    """The type of an entity name: "cabinet 3" -> "cabinet"."""
    return name.rsplit(" ", 1)[0]


def _number(name: str) -> int:
    return int(name.rsplit(" ", 1)[1])


class ObserverExpert:
    """Call `act(observation, admissible)` with the intro first, then with each step's feedback.

    `can_contain` maps a receptacle type to the object types it can hold (ALFRED's placement rules,
    lower-case): common-sense knowledge of where things go, not the state of this game.
    """

    def __init__(self, intro: str, can_contain: Mapping[str, Collection[str]]):
        self.goal = parse_goal(intro)
        self.receptacles = sorted(set(re.findall(_NAME, intro.split("Your task is to:", 1)[0])),
                                  key=lambda r: (entity_type(r), _number(r)))
        self.can_contain = can_contain
        self.contents: dict[str, list[str]] = {}  # receptacle -> objects last seen in/on it
        self.closed: set[str] = set()
        self.here = ""  # receptacle the agent stands at
        self.holding = ""
        self.changed = False  # the held object has been cleaned/heated/cooled
        self.unreachable: set[str] = set()  # seen objects the game would not let us take
        self.dead_ends: set[str] = set()  # receptacles we could not reach
        self.failed: set[str] = set()  # actions that answered "Nothing happens."
        self.last_action = ""
        # Put everything in/on one instance of the goal type: pick-two needs both in the same one.
        self.target_receptacle = next((r for r in self.receptacles if entity_type(r) == self.goal.recep), "")

    def act(self, observation: str, admissible: list[str]) -> str | None:
        """The next action, or None when the expert has nothing left to try."""
        self._observe(observation)
        action = self._decide(set(admissible))
        self.last_action = action or ""
        return action

    # -- memory ---------------------------------------------------------------------------------------

    def _observe(self, text: str) -> None:
        last = self.last_action
        if text == "Nothing happens.":
            # Our commands come from the admissible list; this only guards against retrying one.
            self.failed.add(last)
            return
        if last.startswith(("go to ", "examine ")):
            self.here = last.removeprefix("go to ").removeprefix("examine ")
        for receptacle, seen in re.findall(rf"On the ({_NAME}), you see ([^.]*)\.", text):
            self.contents[receptacle] = re.findall(_NAME, seen)
        for receptacle, seen in re.findall(rf"The ({_NAME}) is open\. In it, you see ([^.]*)\.", text):
            self.contents[receptacle] = re.findall(_NAME, seen)
            self.closed.discard(receptacle)
        for receptacle in re.findall(rf"The ({_NAME}) is closed\.", text):
            self.closed.add(receptacle)
        if match := re.match(rf"You pick up the ({_NAME}) from the ({_NAME})\.", text):
            obj, receptacle = match.groups()
            self.holding, self.changed = obj, False
            self.contents[receptacle].remove(obj)
        elif match := re.match(rf"You put the ({_NAME}) in/on the ({_NAME})\.", text):
            obj, receptacle = match.groups()
            self.holding = ""
            self.contents.setdefault(receptacle, []).append(obj)
        elif re.match(rf"You (clean|heat|cool) the ({_NAME}) using", text):
            self.changed = True

    # -- policy ---------------------------------------------------------------------------------------

    def _decide(self, admissible: set[str]) -> str | None:
        goal = self.goal
        if not self.holding:
            for receptacle, obj in self._known_targets():
                take = f"take {obj} from {receptacle}"
                if take in admissible:
                    return take
                step = self._reach(receptacle, admissible)
                if step:
                    return step
                self.unreachable.add(obj)  # e.g. inside something the game will not let us take from
            return self._explore(goal.obj, admissible)
        if goal.task_type in _APPLIANCES and not self.changed:
            appliance, verb = _APPLIANCES[goal.task_type]
            use = next((a for a in sorted(admissible) if a.startswith(f"{verb} {self.holding} with ")), None)
            return use or self._go_to_first(appliance, admissible)
        if goal.toggle:
            use = next((a for a in sorted(admissible) if a.startswith(f"use {goal.toggle} ")), None)
            if use:
                return use
            lamps = [r for r, objs in self.contents.items() if any(entity_type(o) == goal.toggle for o in objs)]
            for receptacle in sorted(lamps, key=_number):
                step = self._reach(receptacle, admissible)
                if step:
                    return step
            return self._explore(goal.toggle, admissible)
        put = f"put {self.holding} in/on {self.target_receptacle}"
        if put in admissible:
            return put
        return self._reach(self.target_receptacle, admissible)

    def _known_targets(self) -> list[tuple[str, str]]:
        """(receptacle, object) pairs of targets seen and still worth taking."""
        skip = {self.target_receptacle} if self.goal.task_type == "pick_two_obj_and_place" else set()
        return [(r, o) for r in self.receptacles if r not in skip
                for o in self.contents.get(r, []) if entity_type(o) == self.goal.obj and o not in self.unreachable]

    def _explore(self, wanted: str, admissible: set[str]) -> str | None:
        """Step towards the most promising receptacle whose contents we have not seen yet."""
        unseen = [r for r in self.receptacles if r not in self.contents and r not in self.dead_ends]
        for receptacle in sorted(unseen, key=lambda r: self._priority(r, wanted)):
            step = self._reach(receptacle, admissible)
            if step:
                return step
            self.dead_ends.add(receptacle)
        return None

    def _priority(self, receptacle: str, wanted: str) -> tuple:
        rtype = entity_type(receptacle)
        order = SEARCH_ORDER.index(rtype) if rtype in SEARCH_ORDER else len(SEARCH_ORDER)
        return wanted not in self.can_contain.get(rtype, ()), order, _number(receptacle)

    def _go_to_first(self, rtype: str, admissible: set[str]) -> str | None:
        for receptacle in (r for r in self.receptacles if entity_type(r) == rtype):
            step = self._reach(receptacle, admissible, open_it=False)
            if step:
                return step
        return None

    def _reach(self, receptacle: str, admissible: set[str], open_it: bool = True) -> str | None:
        """The action that brings us to `receptacle` (and opens it), or None if there is none to do."""
        if self.here != receptacle:
            # "go to" is not offered for a receptacle at our own spot; examining it shows it instead.
            actions = [f"go to {receptacle}", f"examine {receptacle}"]
        else:
            actions = [f"open {receptacle}"] if open_it and receptacle in self.closed else []
        return next((a for a in actions if a in admissible and a not in self.failed), None)
