"""Trajectory files of the ETO / ShareGPT family: JSON arrays, JSON lines or Parquet, one conversation a record.

A record is `{"conversations": [{"from", "value"}]}` (ShareGPT, as ETO publishes its data), `{"messages":
[{"role", "content"}]}` (chat SFT data; a Parquet file has one of these columns) or a bare list of turns; a turn
may use either pair of keys. Roles are human/user and gpt/assistant, alternating from the first user turn;
system turns may come before it and are dropped (the platform prompts with its own instruction).

ETO opens every conversation with a header: the instruction prompt, the model's "OK", then the task. Files
written elsewhere often leave it out, so it is recognised by what it says, never by position: the first
assistant turn acknowledges (it has neither a thought nor an action) and the user turn after it is not an
observation. Without it the first user turn is the task. Then assistant turns `Thought: ...\\nAction: ...`
alternate with user turns `Observation: ...`. Optional top-level fields the platform adds on export and reads
back on import: id (else `<file stem>_<n>`), env, task, task_id, split, source, reward.
Every record is validated before anything is returned, so a bad file yields nothing; an error names the record
and the field as the file spells it (`messages[3].role`).
"""
from __future__ import annotations

import codecs
import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import polars as pl

from sand.config import import_limits
from sand.errors import SandError, ValidationError
from sand.react import conversation, parse_reply
from sand.trajectory import ENVS, Step, Trajectory

SUFFIXES = (".json", ".jsonl", ".parquet")  # the files the inbox imports
TURNS = ("conversations", "messages")  # the record fields (Parquet columns) that may hold the turns

_OBSERVATION = re.compile(r"^\s*Observation\s*:\s?", re.IGNORECASE)
USER, ASSISTANT, SYSTEM = "user", "assistant", "system"
_ROLES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT, "system": SYSTEM}
_ROLE_NAMES = {USER: "human/user", ASSISTANT: "gpt/assistant"}

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
    """The raw records of a JSON array, JSONL or Parquet file; errors name the file and the line or byte."""
    max_bytes, _ = import_limits()
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise SandError(f"{path}: {size / 2**20:.1f} MB is over the import limit of {max_bytes / 2**20:g} MB "
                            "(SAND_IMPORT_MAX_MB); split the file")
        if path.suffix == ".parquet":
            return _parquet_records(path)
        text = _utf8(path, path.read_bytes())
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


def _utf8(path: Path, data: bytes) -> str:
    """The file's text: UTF-8, after a byte-order mark if it has one (editors on Windows write one)."""
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = start + exc.start
        raise SandError(f"{path}: not UTF-8: byte offset {offset} (0x{data[offset]:02x}) is not part of a UTF-8 "
                        "character; trajectory files are read as UTF-8 (with or without a byte-order mark), "
                        "save it as UTF-8") from None


def _parquet_records(path: Path) -> list[dict]:
    try:
        df = pl.read_parquet(path)
    except pl.exceptions.PolarsError as exc:
        raise SandError(f"{path}: not a readable Parquet file ({exc})") from None
    if not set(TURNS) & set(df.columns):
        raise SandError(f"{path}: no 'conversations' or 'messages' column (it has {', '.join(df.columns)})")
    return df.to_dicts()


@dataclasses.dataclass(frozen=True)
class _Turn:
    role: str  # USER, ASSISTANT or SYSTEM
    text: str
    field: str  # where the file has it: "messages[3]"
    role_key: str  # the keys the file names its role and text with: "from"/"role", "value"/"content"
    text_key: str
    name: str  # the role as the file names it: "gpt"


def _turn(turn, field: str, fail: Callable[[str, str], NoReturn]) -> _Turn:
    """One turn, with either pair of keys (or both, where they agree: role names and text alike)."""
    if not isinstance(turn, dict):
        fail(field, f"expected a turn (an object with 'from'/'value' or 'role'/'content'), got {type(turn).__name__}")
    chat = turn.get("role") is not None or turn.get("content") is not None
    roles = {key: turn[key] for key in ("from", "role") if turn.get(key) is not None}
    texts = {key: turn[key] for key in ("value", "content") if turn.get(key) is not None}
    if not roles:
        fail(f"{field}.{'role' if chat else 'from'}", "missing")
    for key, name in roles.items():
        if not isinstance(name, str) or name not in _ROLES:
            fail(f"{field}.{key}", f"unknown role {name!r}; expected human/user, gpt/assistant or system")
    if len({_ROLES[name] for name in roles.values()}) > 1:
        fail(f"{field}.role", f"'from' is {roles['from']!r} but 'role' is {roles['role']!r}: which is meant?")
    if not texts:
        fail(f"{field}.{'content' if chat else 'value'}", "missing")
    for key, text in texts.items():
        if not isinstance(text, str):
            fail(f"{field}.{key}", f"not a string (a {type(text).__name__})")
    if len(set(texts.values())) > 1:
        fail(f"{field}.content", "'value' and 'content' differ: which is meant?")
    (role_key, name), (text_key, text) = next(iter(roles.items())), next(iter(texts.items()))
    return _Turn(_ROLES[name], text, field, role_key, text_key, name)


def _has_header(body: list[_Turn]) -> bool:
    """ETO's instruction header opens `body` (user and assistant turns, alternating): the instruction prompt,
    an acknowledgement (ETO: "OK"; a reply with neither thought nor action), then the task, which is not an
    observation, and the first action. A first reply with a thought is a step that lacks its action."""
    reply = parse_reply(body[1].text)
    return len(body) >= 4 and reply.action is None and not reply.thought and not _OBSERVATION.match(body[2].text)


def _task_and_steps(turns: list[_Turn], field: str, fail: Callable[[str, str], NoReturn]) -> tuple[str, list[Step]]:
    """The task (the instruction) and the steps of a conversation's turns."""
    body = turns[next((i for i, t in enumerate(turns) if t.role != SYSTEM), len(turns)):]
    for i, turn in enumerate(body):
        expected = USER if i % 2 == 0 else ASSISTANT
        if turn.role != expected:
            where = " (system turns may only open the conversation)" if turn.role == SYSTEM else ""
            fail(f"{turn.field}.{turn.role_key}", f"expected '{_ROLE_NAMES[expected]}', got {turn.name!r}{where}")
    if len(body) < 2:
        fail(field, "must hold the task (a user turn) and the first action (an assistant turn)")
    start = 2 if _has_header(body) else 0
    steps = []
    for i in range(start + 1, len(body), 2):
        reply = parse_reply(body[i].text)
        if reply.action is None:
            header = ("; the first assistant turn may lack one only as an instruction header's acknowledgement "
                      "(no thought either, like ETO's 'OK'), followed by the task and the first action"
                      if i == 1 else "")
            fail(f"{body[i].field}.{body[i].text_key}", f"assistant turn has no 'Action: ...' line{header}")
        observation = _OBSERVATION.sub("", body[i + 1].text, count=1).strip() if i + 1 < len(body) else ""
        steps.append(Step(thought=reply.thought, action=reply.action, observation=observation))
    return body[start].text.strip(), steps


def _given_id(rec) -> str | None:
    value = rec.get("id") if isinstance(rec, dict) else None
    valid = isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip()
    return str(value) if valid else None


def _record_to_trajectory(rec, index: int, path: Path, env: str, source: str, split: str,
                          max_chars: int) -> Trajectory:
    label = _given_id(rec) or f"#{index}"

    def fail(field: str, problem: str) -> NoReturn:
        raise ValidationError(str(path), label, field, problem)

    if isinstance(rec, list):  # a bare list of turns
        meta, field, turns = {}, "", rec
    elif isinstance(rec, dict):
        present = [key for key in TURNS if rec.get(key) is not None]
        if len(present) > 1:
            fail("messages", "the record has both 'conversations' and 'messages': which is meant?")
        if not present:
            fail("(record)", "a single turn: the file must hold conversations (each a list of turns)"
                 if {"from", "role"} & rec.keys() else "no 'conversations' or 'messages' list of turns")
        meta, field = rec, present[0]
        turns = rec[field]
    else:
        fail("(record)", f"expected a conversation (an object or a list of turns), got {type(rec).__name__}")
    if not isinstance(turns, list):
        fail(field, f"must be a list of turns, got {type(turns).__name__}")
    if meta.get("id") is not None and _given_id(meta) is None:
        fail("id", "must be a non-empty string or an integer")
    parsed = [_turn(turn, f"{field}[{i}]", fail) for i, turn in enumerate(turns)]
    for turn in parsed:
        if len(turn.text) > max_chars:
            fail(f"{turn.field}.{turn.text_key}", f"{len(turn.text)} characters, over the import limit of "
                                                  f"{max_chars} (SAND_IMPORT_MAX_FIELD_CHARS)")
    task_text, steps = _task_and_steps(parsed, field or "(record)", fail)
    rec_env = meta.get("env") or env
    if rec_env != env:
        fail("env", f"record says {rec_env!r} but the import is for {env!r}")
    reward = meta.get("reward")
    if reward is not None and (isinstance(reward, bool) or not isinstance(reward, (int, float))
                               or not 0.0 <= reward <= 1.0):
        fail("reward", f"must be a number in [0, 1], got {reward!r}")
    tid = _given_id(meta) or f"{path.stem}_{index}"
    task = meta.get("task") or (alfworld_task_type(task_text) if env == "alfworld" else "unknown")
    return Trajectory(
        id=tid, env=env, task=str(task), task_id=str(meta.get("task_id") or tid),
        split=str(meta.get("split") or split), source=str(meta.get("source") or source),
        instruction=task_text, steps=steps, reward=None if reward is None else float(reward),
    )


def load_eto(path: str | Path, env: str, source: str = "eto", split: str = "train") -> list[Trajectory]:
    """Read and validate a trajectory file. Raises ValidationError on the first bad record; returns all or
    nothing."""
    path = Path(path)
    if env not in ENVS:
        raise SandError(f"unknown environment {env!r}; choose one of {', '.join(ENVS)}")
    records = read_records(path)
    if not isinstance(records, list) or not records:
        raise SandError(f"{path}: no records (expected a JSON array, JSON lines or Parquet rows of conversations)")
    _, max_chars = import_limits()
    trajectories = [_record_to_trajectory(rec, i, path, env, source, split, max_chars)
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
