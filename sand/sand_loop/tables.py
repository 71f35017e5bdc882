"""The SAND loop's catalog tables: row schemas and conversions between dataclasses and polars frames.

One row per dataclass object, columns named as its fields (rollouts add a derived `steps` count).
Reading a table back gives the objects the next stage takes, which is how a run resumes from the store.
"""
from __future__ import annotations

from dataclasses import asdict, fields

import polars as pl

from sand.sand_loop.critique import Critique, Rollout
from sand.sand_loop.sampling import StepCandidates
from sand.sand_loop.synthesis import Deliberation

_KEY = {"task_id": pl.Utf8, "prefix_len": pl.Int32, "prefix_digest": pl.Utf8, "action": pl.Utf8,
        "trajectory_id": pl.Utf8, "step": pl.Int32}
_TEXTS = pl.List(pl.Utf8)

CANDIDATES_SCHEMA: dict[str, pl.DataType] = {
    "trajectory_id": pl.Utf8, "step": pl.Int32, "expert_action": pl.Utf8, "candidates": _TEXTS,
    "n_samples": pl.Int32, "format_errors": pl.Int32, "uncertain": pl.Boolean, "samples": _TEXTS,
}
ROLLOUTS_SCHEMA: dict[str, pl.DataType] = {
    **_KEY, "executed": pl.Utf8, "thoughts": _TEXTS, "actions": _TEXTS, "observations": _TEXTS,
    "reward": pl.Float64, "steps": pl.Int32, "done": pl.Boolean, "agent": pl.Utf8,
}
CRITIQUES_SCHEMA: dict[str, pl.DataType] = {
    **_KEY, "verdict": pl.Utf8, "verdict_inferred": pl.Boolean, "text": pl.Utf8, "critic": pl.Utf8,
}
DELIBERATIONS_SCHEMA: dict[str, pl.DataType] = {
    "trajectory_id": pl.Utf8, "step": pl.Int32, "thought": pl.Utf8, "answer": pl.Utf8, "candidates": _TEXTS,
    "fallback": pl.Boolean, "retried": pl.Boolean, "mode": pl.Utf8,
}


def _frame(items: list, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    return pl.DataFrame([asdict(x) for x in items], schema=schema, orient="row")


def _objects(df: pl.DataFrame, cls) -> list:
    names = [f.name for f in fields(cls)]
    return [cls(**row) for row in df.select(names).iter_rows(named=True)]


def candidates_frame(items: list[StepCandidates]) -> pl.DataFrame:
    return _frame(items, CANDIDATES_SCHEMA)


def rollouts_frame(items: list[Rollout]) -> pl.DataFrame:
    return pl.DataFrame([{**asdict(r), "steps": len(r.actions)} for r in items], schema=ROLLOUTS_SCHEMA,
                        orient="row")


def critiques_frame(items: list[Critique]) -> pl.DataFrame:
    return _frame(items, CRITIQUES_SCHEMA)


def deliberations_frame(items: list[Deliberation]) -> pl.DataFrame:
    return _frame(items, DELIBERATIONS_SCHEMA)


def candidates_from_frame(df: pl.DataFrame) -> list[StepCandidates]:
    return _objects(df, StepCandidates)


def rollouts_from_frame(df: pl.DataFrame) -> list[Rollout]:
    return _objects(df, Rollout)


def critiques_from_frame(df: pl.DataFrame) -> list[Critique]:
    return _objects(df, Critique)


def deliberations_from_frame(df: pl.DataFrame) -> list[Deliberation]:
    return _objects(df, Deliberation)
