"""An experiment's scoreboard: one row per agent (base, sft, iter_1, ...), one column per env/split.

Read from the catalog's `evaluation_summary` view, so the numbers are exactly what SQL shows.
"""
from __future__ import annotations

import polars as pl

from sand.store import Store

METRICS = ("avg_reward", "success_rate", "format_error_rate", "deliberation_rate", "tokens_per_task")


def _summary(store: Store, experiment: str) -> pl.DataFrame:
    return store.sql("select agent, coalesce(iteration, -1) as iteration, env || '/' || split as split, episodes, "
                     f"{', '.join(METRICS)} from evaluation_summary where experiment = ?", params=[experiment])


def _pivot(summary: pl.DataFrame, metric: str) -> pl.DataFrame:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    if summary.is_empty():
        return summary
    table = summary.sort("split").pivot(on="split", index=["iteration", "agent"], values=metric).sort("iteration")
    splits = [c for c in table.columns if c not in ("iteration", "agent")]
    return table.with_columns(mean=pl.mean_horizontal(splits).round(2)).drop("iteration")


def scoreboard(store: Store, experiment: str, metric: str = "avg_reward") -> pl.DataFrame:
    """`metric` of every evaluated agent of `experiment` per env/split, agents in training order, and the
    mean over splits (splits weigh equally, as in the paper's average column)."""
    return _pivot(_summary(store, experiment), metric)


def format_report(store: Store, experiment: str) -> str:
    """The scoreboard for each metric, as text tables (one catalog query)."""
    summary = _summary(store, experiment)
    if summary.is_empty():
        return f"{experiment}: no evaluations yet"
    episodes = summary.group_by("split").agg(pl.col("episodes").max()).sort("split")
    header = ", ".join(f"{s} ({n} episodes)" for s, n in episodes.iter_rows())
    parts = [f"{experiment}: {header}"]
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True,
                   tbl_hide_dtype_separator=True, tbl_formatting="MARKDOWN"):
        for metric in ("avg_reward", "success_rate", "format_error_rate"):
            parts.append(f"\n{metric}\n{_pivot(summary, metric)}")
    return "\n".join(parts)
