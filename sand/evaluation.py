"""The evaluation harness: greedy episodes through the rollout engine, one record per episode, and
the paper's per-split metrics.

Resumable per episode: with a work log (`sand.worklog.WorkLog`), each record is appended as its episode
ends, and a rerun skips the tasks the log already holds for the same adapter. The key is (env, task_id,
adapter identity) only: use one log per model and evaluation settings. The per-split metrics are the
catalog's `evaluation_summary` view (sand.schemas).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import polars as pl

from sand.envs.base import Environment, TaskSpec
from sand.errors import SandError
from sand.models.backends import Backend, SamplingParams, adapter_key
from sand.react import REPLY_STOP
from sand.rollout import EpisodeRequest, EpisodeResult, RolloutEngine
from sand.schemas import TRANSCRIPT
from sand.worklog import WorkLog

# Phrases a deliberation thought uses (lowercase); the deliberation synthesis prompt writes them.
DELIBERATION_MARKERS = ("candidate action", "candidates:", "options:", "let me compare", "let me weigh",
                        "comparing the", "alternatively")
# Quoted spans: "..", `..`, “..”, and '..' when the quotes are not apostrophes (I'll, agent's).
_QUOTED = re.compile(r"\"([^\"\n]+)\"|`([^`\n]+)`|“([^”\n]+)”|(?<!\w)'([^'\n]+)'(?!\w)")
# List items: lines opening with a bullet, "1." / "1)" / "(1)", or "Option 1:" / "Candidate 2:".
_LIST_ITEM = re.compile(r"^[ \t]*(?:[-*•]|\(?\d+[.):]|(?:option|candidate)[ \t]*\w+[ \t]*[:.)])[ \t]*(\S.*)$",
                        re.IGNORECASE | re.MULTILINE)
_MAX_ACTION_WORDS = 12  # a longer quoted span is a sentence, not an action


def is_deliberation(thought: str) -> bool:
    """Whether a thought weighs several candidate actions (the SAND deliberation metric).

    True when the thought contains one of DELIBERATION_MARKERS, or names at least two distinct
    candidate actions: quoted spans of 1-12 words ("go to shelf 1", 'open drawer 2', `look`) or
    list items (lines starting with -, *, •, 1., 1), (1), "Option 1:", "Candidate 1:"), compared
    case-insensitively. Plain ReAct thoughts ("Now I take the mug from the shelf.") are not.
    """
    text = thought.lower()
    if any(marker in text for marker in DELIBERATION_MARKERS):
        return True
    quoted = {next(g for g in m.groups() if g) for m in _QUOTED.finditer(text)}
    candidates = {c.strip(" .,;:") for c in quoted if 1 <= len(c.split()) <= _MAX_ACTION_WORDS}
    candidates |= {item.strip(" .,;:") for item in _LIST_ITEM.findall(text)}
    return len(candidates - {""}) >= 2


@dataclass
class EpisodeRecord:
    """One evaluated episode: the columns of the store's `evaluations` table the harness knows."""

    env: str
    split: str
    task: str
    task_id: str
    reward: float  # ScienceWorld: the best normalised score reached; ALFWorld: 1 if won, else 0
    success: bool  # reward >= 1
    steps: int
    format_errors: int
    invalid_actions: int
    max_invalid_streak: int | None  # the setting this episode ran under (None: no cut-off)
    invalid_cutoff: bool  # ended by max_invalid_streak consecutive invalid actions
    deliberation_steps: int  # agent steps whose thought is_deliberation()
    prompt_tokens: int
    completion_tokens: int
    transcript: list[dict]  # per agent step (sand.schemas.TRANSCRIPT): reply, thought, action, observation, ...


def record_of(result: EpisodeResult) -> EpisodeRecord:
    task = result.request.task
    return EpisodeRecord(
        env=task.env, split=task.split, task=task.task, task_id=task.task_id, reward=result.reward,
        success=result.reward >= 1.0, steps=len(result.steps), format_errors=result.format_errors,
        invalid_actions=result.invalid_actions, max_invalid_streak=result.request.max_invalid_streak,
        invalid_cutoff=result.invalid_cutoff,
        deliberation_steps=sum(is_deliberation(s.thought) for s in result.agent_steps),
        prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens, transcript=transcript(result))


def transcript(result: EpisodeResult) -> list[dict]:
    """The agent's steps of an episode, each with its raw reply and the environment's answer and score."""
    forced = len(result.steps) - len(result.agent_steps)
    return [{"reply": reply, "thought": s.thought, "action": s.action, "observation": s.observation, "valid": valid,
             "score": score} for reply, s, valid, score in zip(result.replies, result.agent_steps,
                                                                result.valid[forced:], result.scores[forced + 1:],
                                                                strict=True)]


def adapter_identity(adapter: str | None) -> str:
    """"base", or the adapter folder and its weights' mtime (a retrained adapter is evaluated again)."""
    if adapter is None:
        return "base"
    folder, mtime = adapter_key(adapter)
    return f"{folder}@{mtime}"


def _recorded(log: WorkLog | None, identity: str) -> dict[tuple[str, str], EpisodeRecord]:
    if log is None or not log.exists():
        return {}
    names = [f.name for f in fields(EpisodeRecord)]
    rows = log.frame().filter(pl.col("adapter") == identity).iter_rows(named=True)
    return {(r["env"], r["task_id"]): EpisodeRecord(**{n: r[n] for n in names}) for r in rows}


def _cap(*limits: int | None) -> int | None:
    """The lowest of the limits given (None: no limit)."""
    return min((n for n in limits if n is not None), default=None)


def evaluate(backend: Backend, make_env: Callable[[], Environment], tasks: list[TaskSpec],
             adapter: str | None = None, pool_size: int = 8, history_steps: int | None = None,
             max_steps: int | None = None, max_new_tokens: int = 128, max_invalid_streak: int | None = 10,
             task_max_steps: dict[str, int] | None = None, log: WorkLog | None = None) -> list[EpisodeRecord]:
    """One greedy episode per task (in `tasks` order; duplicates run once); see the module doc for
    resuming. `max_steps` caps episodes below the task's own limit (None: the task's limit), and
    `task_max_steps` caps tasks of the named types (TaskSpec.task) lower still; an episode ends after
    `max_invalid_streak` consecutive invalid actions (None: never)."""
    unknown = sorted(set(task_max_steps or {}) - {t.task for t in tasks})
    if unknown:
        raise SandError(f"task_max_steps names task types that are not evaluated: {', '.join(unknown)}")
    identity = adapter_identity(adapter)
    done = _recorded(log, identity)
    todo = list({(t.env, t.task_id): t for t in tasks if (t.env, t.task_id) not in done}.values())
    if todo:
        params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop=REPLY_STOP)
        with RolloutEngine(backend, make_env, pool_size, params, history_steps) as engine:
            requests = [EpisodeRequest(t, max_steps=_cap(max_steps, (task_max_steps or {}).get(t.task)),
                                       max_invalid_streak=max_invalid_streak) for t in todo]
            for result in engine.run(requests, adapter):
                record = record_of(result)
                done[record.env, record.task_id] = record
                if log is not None:
                    log.append(pl.DataFrame([{"adapter": identity, **asdict(record)}],  # parts concatenate
                                            schema_overrides={"max_invalid_streak": pl.Int64,
                                                              "transcript": TRANSCRIPT}))
    return [done[t.env, t.task_id] for t in tasks]
