"""Checks a trajectory dataset must pass before anything trains on it."""
from __future__ import annotations

import polars as pl

from sand.trajectory import ENVS, TRAJECTORY_SCHEMA


def trajectory_problems(df: pl.DataFrame, limit: int = 10) -> list[str]:
    """Human-readable problems, each naming the offending trajectory ids (empty list: all good)."""
    problems = []
    if dict(df.schema) != TRAJECTORY_SCHEMA:
        diff = {c: str(t) for c, t in df.schema.items() if TRAJECTORY_SCHEMA.get(c) != t}
        missing = [c for c in TRAJECTORY_SCHEMA if c not in df.columns]
        problems.append(f"schema differs: missing {missing}, unexpected or mistyped {diff}")
        return problems

    def ids(mask: pl.Expr) -> list[str]:
        return df.filter(mask)["id"].head(limit).to_list()

    steps = df.select("id", pl.col("steps")).explode("steps").unnest("steps")
    checks = {
        "duplicate id": ids(pl.col("id").is_duplicated()),
        "empty id": ids(pl.col("id").is_null() | (pl.col("id").str.strip_chars() == "")),
        f"env not one of {ENVS}": ids(~pl.col("env").is_in(ENVS) | pl.col("env").is_null()),
        "no steps": ids(pl.col("n_steps").fill_null(0) == 0),
        "n_steps differs from the steps list": ids(pl.col("n_steps") != pl.col("steps").list.len()),
        "reward outside [0, 1]": ids(pl.col("reward").is_not_null() & ~pl.col("reward").is_between(0.0, 1.0)),
        "empty instruction": ids(pl.col("instruction").fill_null("").str.strip_chars() == ""),
    }
    bad_actions = steps.filter(pl.col("action").fill_null("").str.strip_chars() == "")["id"].unique().head(limit)
    checks["a step has an empty action"] = bad_actions.to_list()
    problems += [f"{what}: {bad}" for what, bad in checks.items() if bad]
    return problems
