"""ETO / ShareGPT trajectories: `{"id", "conversations": [{"from", "value"}]}`, as JSON or JSONL.

Turn 0 is the instruction prompt, turn 1 the model's "OK", turn 2 the task, then assistant turns
`Thought: ...\\nAction: ...` alternate with user turns `Observation: ...`. Optional top-level fields
the platform adds on export and reads back on import: env, task, task_id, split, source, reward.
Every record is validated before anything is returned, so a bad file yields nothing.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from sand.config import import_limits
from sand.errors import SandError, ValidationError
from sand.react import conversation, parse_reply
from sand.trajectory import ENVS, Step, Trajectory

_OBSERVATION = re.compile(r"^\s*Observation\s*:\s?", re.IGNORECASE)

# ALFWorld task types, recognised from the goal sentence in the classic wording.
_ALFWORLD_TYPES = [
    (re.compile(r"\btwo\b"), "pick_two_obj_and_place"),
    (re.compile(r"\b(desklamp|floorlamp|lamp|light)\b"), "look_at_obj_in_light"),
    (re.compile(r"\bclean"), "pick_clean_then_place_in_recep"),
    (re.compile(r"\b(hot|heat)"), "pick_heat_then_place_in_recep"),
    (re.compile(r"\b(cool|cold)"), "pick_cool_then_place_in_recep"),
    (re.compile(r"\bput\b"), "pick_and_place_simple"),
]


def alfworld_task_type(task_text: str) -> str:
    goal = task_text.split("Your task is to:")[-1].lower()
    return next((name for pattern, name in _ALFWORLD_TYPES if pattern.search(goal)), "unknown")


def read_records(path: Path) -> list:
    """The raw records of a JSON array or JSONL file; errors name the file and line."""
    max_bytes, _ = import_limits()
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise SandError(f"{path}: {size / 2**20:.1f} MB is over the import limit of {max_bytes / 2**20:g} MB "
                            "(SAND_IMPORT_MAX_MB); split the file")
        text = path.read_text()
    except OSError as exc:
        raise SandError(f"{path}: cannot read: {exc.strerror}") from None
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise SandError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise SandError(f"{path}: line {lineno} is not valid JSON ({exc.msg})") from None
    return records


def _record_to_trajectory(rec, index: int, file: str, env: str, source: str, split: str,
                          max_chars: int) -> Trajectory:
    label = rec.get("id", f"#{index}") if isinstance(rec, dict) else f"#{index}"

    def fail(field: str, problem: str):
        raise ValidationError(file, label, field, problem)

    if not isinstance(rec, dict):
        fail("(record)", f"expected an object, got {type(rec).__name__}")
    if not isinstance(rec.get("id"), str) or not rec["id"].strip():
        fail("id", "missing or not a non-empty string")
    turns = rec.get("conversations")
    if not isinstance(turns, list) or len(turns) < 4:
        fail("conversations", "must be a list of at least 4 turns (instruction, OK, task, first action)")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            fail(f"conversations[{i}].value", "missing or not a string")
        if len(turn["value"]) > max_chars:
            fail(f"conversations[{i}].value", f"{len(turn['value'])} characters, over the import limit of "
                                              f"{max_chars} (SAND_IMPORT_MAX_FIELD_CHARS)")
        expected = "human" if i % 2 == 0 else "gpt"
        if turn.get("from") != expected:
            fail(f"conversations[{i}].from", f"expected '{expected}', got {turn.get('from')!r}")
    rec_env = rec.get("env", env)
    if rec_env != env:
        fail("env", f"record says {rec_env!r} but the import is for {env!r}")
    reward = rec.get("reward")
    if reward is not None and (isinstance(reward, bool) or not isinstance(reward, (int, float))
                               or not 0.0 <= reward <= 1.0):
        fail("reward", f"must be a number in [0, 1], got {reward!r}")

    task_text = turns[2]["value"].strip()
    steps = []
    for i in range(3, len(turns), 2):
        reply = parse_reply(turns[i]["value"])
        if reply.action is None:
            fail(f"conversations[{i}].value", "assistant turn has no 'Action: ...' line")
        observation = _OBSERVATION.sub("", turns[i + 1]["value"], count=1).strip() if i + 1 < len(turns) else ""
        steps.append(Step(thought=reply.thought, action=reply.action, observation=observation))
    task = rec.get("task") or (alfworld_task_type(task_text) if env == "alfworld" else "unknown")
    return Trajectory(
        id=rec["id"], env=env, task=str(task), task_id=str(rec.get("task_id") or rec["id"]),
        split=str(rec.get("split") or split), source=str(rec.get("source") or source),
        instruction=task_text, steps=steps, reward=None if reward is None else float(reward),
    )


def load_eto(path: str | Path, env: str, source: str = "eto", split: str = "train") -> list[Trajectory]:
    """Read and validate an ETO file. Raises ValidationError on the first bad record; returns all or nothing."""
    path = Path(path)
    if env not in ENVS:
        raise SandError(f"unknown environment {env!r}; choose one of {', '.join(ENVS)}")
    records = read_records(path)
    if not isinstance(records, list) or not records:
        raise SandError(f"{path}: no records (expected a JSON array or JSON lines of conversations)")
    _, max_chars = import_limits()
    trajectories = [_record_to_trajectory(rec, i, str(path), env, source, split, max_chars)
                    for i, rec in enumerate(records)]
    seen: set[str] = set()
    for t in trajectories:
        if t.id in seen:
            raise ValidationError(str(path), t.id, "id", "duplicate id in this file")
        seen.add(t.id)
    return trajectories


def to_record(t: Trajectory, strip: bool = False) -> dict:
    """An ETO record; with `strip`, only `id` and `conversations`, as ETO publishes its data."""
    roles = {"user": "human", "assistant": "gpt"}
    turns = [{"from": roles[m["role"]], "value": m["content"]} for m in conversation(t.env, t.instruction, t.steps)]
    if strip:
        return {"id": t.id, "conversations": turns}
    return {
        "id": t.id, "env": t.env, "task": t.task, "task_id": t.task_id, "split": t.split, "source": t.source,
        "reward": t.reward, "conversations": turns,
    }


def write_eto(trajectories: list[Trajectory], path: str | Path, strip: bool = False) -> Path:
    """Write trajectories as ETO records: JSONL if the name ends in .jsonl, else a JSON array. `strip` leaves
    out everything the platform adds: the fields other than the conversation, and ids (which name the task
    of trajectories recorded here) become `<env>_<n>` in file order."""
    path = Path(path)
    if strip:
        trajectories = [dataclasses.replace(t, id=f"{t.env}_{i}") for i, t in enumerate(trajectories)]
    records = [to_record(t, strip) for t in trajectories]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        if path.suffix == ".jsonl":
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        else:
            json.dump(records, f, ensure_ascii=False, indent=1)
    tmp.replace(path)
    return path
