"""The SAND loop's catalog tables: row schemas and conversions between dataclasses and polars frames.

One row per dataclass object, columns named as its fields (rollouts add a derived `steps` count, critiques
whether the critic agrees with the evidence).
Reading a table back gives the objects the next stage takes, which is how a run resumes from the store.
"""
from __future__ import annotations

from dataclasses import asdict, fields

import polars as pl

from sand.sand_loop.critique import Critique, Rollout
from sand.sand_loop.deliberation import Deliberation
from sand.sand_loop.sampling import StepCandidates
from sand.schemas import CANDIDATES_SCHEMA, CRITIQUES_SCHEMA, DELIBERATIONS_SCHEMA, ROLLOUTS_SCHEMA


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
    return pl.DataFrame([{**asdict(c), "agrees": c.agrees} for c in items], schema=CRITIQUES_SCHEMA, orient="row")


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
