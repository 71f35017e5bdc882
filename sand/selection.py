"""Deterministic subsets: which trajectories an experiment trains on, which tasks it evaluates."""
from __future__ import annotations

import hashlib
from itertools import chain, zip_longest

import polars as pl

from sand.envs.base import TaskSpec
from sand.formats.resolve import FAITHFUL
from sand.trajectory import Trajectory


def _stable_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def training_subset(expert: pl.DataFrame, per_env: dict[str, int | None],
                    tasks: dict[str, list[str]] | None = None) -> pl.DataFrame:
    """Up to N trajectories per environment (None: all), in a stable pseudo-random order so a
    small N still mixes task types; environments not named are left out, and where `tasks` names an
    environment's task types, so are its other types."""
    parts = []
    for env, limit in sorted(per_env.items()):
        rows = expert.filter(pl.col("env") == env)
        if (tasks or {}).get(env):
            rows = rows.filter(pl.col("task").is_in(tasks[env]))
        rows = rows.with_columns(_k=pl.col("id").map_elements(_stable_key, return_dtype=pl.Utf8)).sort("_k")
        parts.append(rows.drop("_k").head(limit) if limit is not None else rows.drop("_k"))
    return pl.concat(parts) if parts else expert.head(0)


def spread_tasks(tasks: list[TaskSpec], limit: int | None) -> list[TaskSpec]:
    """The first `limit` tasks taking task types in turn, so a small evaluation covers every type."""
    by_type: dict[str, list[TaskSpec]] = {}
    for task in tasks:
        by_type.setdefault(task.task, []).append(task)
    interleaved = [t for t in chain.from_iterable(zip_longest(*by_type.values())) if t is not None]
    return interleaved[:limit] if limit is not None else interleaved


def replayable(trajectory: Trajectory) -> bool:
    """Whether the environments here can replay `trajectory`: only such trajectories are deliberated over.
    True for those recorded here (they need no resolution) and, whatever their source, for imported ones
    matched to a task they replay faithfully in (sand.formats.resolve)."""
    return trajectory.resolution is None or trajectory.replay == FAITHFUL
