"""An experiment's results with their uncertainty: the scoreboard (one row per agent, iteration, env and split,
with a 95% bootstrap interval of the average reward) and paired comparisons of agents on the tasks both were
evaluated on (sand.stats).

The metrics come from the catalog's `evaluation_summary` view, so they are exactly what SQL shows; the
intervals are computed here from the per-episode `evaluations` rows (episodes in task-id order, seeded).
Bootstrapping in SQL took seconds per query; so the intervals are computed once per evaluation
(`record_uncertainty`, called by each evaluation asset) and stored in the `evaluation_intervals` and
`agent_comparisons` tables, which the `evaluation_summary` and `agent_comparison` views show. Rewards are
in [0, 1] in the tables and x100 in the views and here, as the paper reports them.
"""
from __future__ import annotations

import polars as pl

from sand.errors import SandError
from sand.stats import LEVEL, N_BOOT, bootstrap_ci, paired_comparison
from sand.store import Lineage, Store

SEED = 0
# Per-episode shares of steps, compared in pairs besides the reward: what a small agent learns first (the ReAct
# format, then actions the environment accepts) shows there while its rewards are still zero.
STEP_SHARES = {"well_formed": ("replies with an action", "1 - format_errors / greatest(steps, 1)"),
               "accepted": ("actions the environment accepted",
                            "1 - (format_errors + invalid_actions) / greatest(steps, 1)")}
METRICS = ("avg_reward", "success_rate", "format_error_rate", "deliberation_rate", "tokens_per_task")
SCOREBOARD_SCHEMA = {"agent": pl.Utf8, "iteration": pl.Int32, "env": pl.Utf8, "split": pl.Utf8,
                     "episodes": pl.Int64, "avg_reward": pl.Float64, "ci_lo": pl.Float64, "ci_hi": pl.Float64,
                     **{m: pl.Float64 for m in METRICS[1:]}}
COMPARISON_SCHEMA = {"agent": pl.Utf8, "env": pl.Utf8, "split": pl.Utf8, "n": pl.Int64, "mean_diff": pl.Float64,
                     "lo": pl.Float64, "hi": pl.Float64, "won": pl.Int64, "lost": pl.Int64, "tied": pl.Int64}


def _read(store: Store, experiment: str, summary: bool = False) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    """The experiment's current episodes, agents in training order (base, sft, iter_1, ...), and, if asked,
    its `evaluation_summary` rows: one catalog connection (declaring the views is most of a query's cost)."""
    with store.connect() as con:
        shares = "".join(f"{sql} as {name}, " for name, (_, sql) in STEP_SHARES.items())
        episodes = con.sql(f"select agent, iteration, env, split, task_id, reward, {shares}version from evaluations "
                           "where experiment = ? order by coalesce(iteration, -1), agent, env, split, task_id",
                           params=[experiment]).pl()
        metrics = con.sql(f"select agent, iteration, env, split, episodes, {', '.join(METRICS)} "
                          "from evaluation_summary where experiment = ?", params=[experiment]).pl() if summary else None
    return episodes, metrics


def _agents(episodes: pl.DataFrame) -> list[str]:
    return list(dict.fromkeys(episodes["agent"]))


def _rewards(episodes: pl.DataFrame, agent: str, column: str = "reward") -> dict[tuple[str, str, str], float]:
    rows = episodes.filter(pl.col("agent") == agent)
    return {(r["env"], r["split"], r["task_id"]): r[column] for r in rows.iter_rows(named=True)}


def _intervals(episodes: pl.DataFrame, agent: str) -> list[dict]:
    """One row per env/split of `agent`: episodes, mean and interval (rewards in [0, 1])."""
    rows = []
    for (env, split), group in episodes.filter(pl.col("agent") == agent).group_by(["env", "split"],
                                                                                  maintain_order=True):
        ci = bootstrap_ci(group.sort("task_id")["reward"].to_list(), seed=SEED)
        rows.append({"env": env, "split": split, "episodes": ci.n, "mean": ci.mean, "ci_lo": ci.lo, "ci_hi": ci.hi})
    return rows


def _paired(episodes: pl.DataFrame, agent: str, baseline: str) -> list[dict]:
    """One row per env/split both agents were evaluated on: `agent` - `baseline` (rewards in [0, 1])."""
    a, b = _rewards(episodes, agent), _rewards(episodes, baseline)
    rows = []
    for env, split in dict.fromkeys((env, split) for env, split, _ in a):
        p = paired_comparison({k: v for k, v in a.items() if k[:2] == (env, split)}, b, seed=SEED)
        if p.n:
            rows.append({"env": env, "split": split, "n": p.n, "mean_diff": p.mean_diff, "lo": p.lo, "hi": p.hi,
                         "won": p.won, "lost": p.lost, "tied": p.tied})
    return rows


def _x100(df: pl.DataFrame, *columns: str) -> pl.DataFrame:
    return df.with_columns([(pl.col(c) * 100).round(1) for c in columns])


def scoreboard(store: Store, experiment: str) -> pl.DataFrame:
    """One row per (agent, iteration, env, split) of `experiment`, agents in training order: episodes,
    avg_reward x100 with its 95% bootstrap interval (ci_lo, ci_hi), success_rate, format_error_rate,
    deliberation_rate and tokens_per_task (as `evaluation_summary` defines them)."""
    return _scoreboard(*_read(store, experiment, summary=True))


def _scoreboard(episodes: pl.DataFrame, summary: pl.DataFrame) -> pl.DataFrame:
    if summary.is_empty():
        return pl.DataFrame(schema=SCOREBOARD_SCHEMA)
    intervals = pl.DataFrame([{"agent": agent, **row} for agent in _agents(episodes)
                              for row in _intervals(episodes, agent)])
    order = {agent: i for i, agent in enumerate(_agents(episodes))}
    board = summary.join(_x100(intervals, "ci_lo", "ci_hi").select("agent", "env", "split", "ci_lo", "ci_hi"),
                         on=["agent", "env", "split"], how="left")
    return (board.with_columns(order=pl.col("agent").replace_strict(order, return_dtype=pl.Int32))
            .sort("order", "env", "split").select(list(SCOREBOARD_SCHEMA)).cast(SCOREBOARD_SCHEMA))


def comparisons(store: Store, experiment: str, baseline: str = "sft") -> pl.DataFrame:
    """Every other agent of `experiment` against `baseline`, per env/split, on the tasks both were evaluated
    on: n, mean_diff = agent - baseline (x100) with its 95% bootstrap interval (lo, hi), tasks won / lost /
    tied. Empty when nothing is evaluated; an error when the baseline is not among the evaluated agents."""
    return _comparisons(_read(store, experiment)[0], experiment, baseline)


def _comparisons(episodes: pl.DataFrame, experiment: str, baseline: str) -> pl.DataFrame:
    agents = _agents(episodes)
    if not agents:
        return pl.DataFrame(schema=COMPARISON_SCHEMA)
    if baseline not in agents:
        raise SandError(f"{experiment}: no evaluations of agent {baseline!r} to compare with "
                        f"(evaluated: {', '.join(agents)})")
    rows = [{"agent": agent, **row} for agent in agents if agent != baseline
            for row in _paired(episodes, agent, baseline)]
    return _x100(pl.DataFrame(rows, schema=COMPARISON_SCHEMA), "mean_diff", "lo", "hi")


def comparison_line(episodes: pl.DataFrame, agent: str, baseline: str, column: str = "reward") -> str:
    """`agent vs baseline: +x.x [lo, hi] (n tasks, won/lost/tied)` over every task both were evaluated on
    (all splits pooled, so splits weigh by their episodes), the episodes' `column` (reward, or a STEP_SHARES name)
    x100."""
    p = paired_comparison(_rewards(episodes, agent, column), _rewards(episodes, baseline, column), seed=SEED)
    if not p.n:
        return f"{agent} vs {baseline}: no common tasks"
    return f"{agent} vs {baseline}: {p.x100()} ({p.n} tasks, won/lost/tied {p.won}/{p.lost}/{p.tied})"


def record_uncertainty(store: Store, experiment: str, agent: str, lineage: Lineage) -> dict[str, float | int]:
    """Store `agent`'s intervals and its paired comparisons with every other evaluated agent of `experiment`
    (both directions, so a pair is current whichever agent was evaluated last), keyed by the evaluation
    versions they come from. Returns numeric metadata per env/split: `<env>/<split>/avg_reward`, `/ci_lo`,
    `/ci_hi` (x100) and `/episodes`, named the same in every materialization."""
    episodes = _read(store, experiment)[0]
    if agent not in _agents(episodes):
        raise SandError(f"{experiment}: agent {agent!r} has no evaluations to summarise")
    version = dict(episodes.select("agent", "version").unique().iter_rows())
    bootstrap = {"level": LEVEL, "n_boot": N_BOOT, "seed": SEED}
    intervals = [{"experiment": experiment, "agent": agent, "evaluation": version[agent], **row, **bootstrap}
                 for row in _intervals(episodes, agent)]
    pairs = [{"experiment": experiment, "agent": a, "evaluation": version[a], "baseline": b,
              "baseline_evaluation": version[b], **row, **bootstrap}
             for other in _agents(episodes) if other != agent
             for a, b in ((agent, other), (other, agent)) for row in _paired(episodes, a, b)]
    dataset = f"{experiment}/{agent}"
    store.write("evaluation_intervals", dataset, pl.DataFrame(intervals), lineage)
    if pairs:
        store.write("agent_comparisons", dataset, pl.DataFrame(pairs), lineage)
    metadata: dict[str, float | int] = {}
    for row in intervals:
        key = f"{row['env']}/{row['split']}"
        metadata |= {f"{key}/avg_reward": round(100 * row["mean"], 1), f"{key}/ci_lo": round(100 * row["ci_lo"], 1),
                     f"{key}/ci_hi": round(100 * row["ci_hi"], 1), f"{key}/episodes": row["episodes"]}
    return metadata


def _table(df: pl.DataFrame) -> str:
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True,
                   tbl_hide_dtype_separator=True, tbl_formatting="MARKDOWN", fmt_str_lengths=40):
        return str(df)


def _pivot(board: pl.DataFrame, values: pl.Expr) -> pl.DataFrame:
    cells = board.select("agent", pl.concat_str("env", pl.lit("/"), "split").alias("split"), values.alias("cell"))
    return cells.pivot(on="split", index="agent", values="cell", sort_columns=True)


def format_report(store: Store, experiment: str, vs: list[str] | None = None) -> str:
    """The scoreboard as text: average reward with its interval, success, format errors, deliberation rate
    and tokens per agent and split; the per-split paired comparisons; one line per comparison of each step
    share (STEP_SHARES); last, one line per comparison of rewards,
    `agent vs baseline: +x.x [lo, hi] (n tasks, won/lost/tied)`. `vs`: the baselines (default: every agent
    against its control first, then each agent before it in training order: `default_pairs`)."""
    episodes, summary = _read(store, experiment, summary=True)
    board = _scoreboard(episodes, summary)
    if board.is_empty():
        return f"{experiment}: no evaluations yet"
    agents = list(dict.fromkeys(board["agent"]))
    counts = board.group_by("env", "split").agg(pl.col("episodes").max()).sort("env", "split")
    header = ", ".join(f"{e}/{s} ({n} episodes)" for e, s, n in counts.iter_rows())
    parts = [f"{experiment}: {header}",
             "\navg_reward x100 [95% bootstrap interval over episodes]\n" + _table(_pivot(board, pl.format(
                 "{} [{}, {}]", pl.col("avg_reward"), pl.col("ci_lo"), pl.col("ci_hi"))))]
    for metric in METRICS[1:]:
        parts.append(f"\n{metric}\n{_table(_pivot(board, pl.col(metric)))}")
    unknown = [b for b in vs or () if b not in agents]
    if unknown:
        raise SandError(f"{experiment}: no evaluations of {', '.join(map(repr, unknown))} to compare with "
                        f"(evaluated: {', '.join(agents)})")
    pairs = [(a, b) for b in vs for a in agents if a != b] if vs else default_pairs(agents)
    for baseline in dict.fromkeys(b for _, b in pairs):
        table = _comparisons(episodes, experiment, baseline).filter(pl.col("agent").is_in([a for a, b in pairs
                                                                                        if b == baseline]))
        parts.append(f"\nvs {baseline}: mean difference x100 [95% paired bootstrap interval], tasks won/lost/tied\n"
                     + _table(_pivot(table, pl.format("{} [{}, {}] {}/{}/{}", pl.col("mean_diff"), pl.col("lo"),
                                                      pl.col("hi"), "won", "lost", "tied"))))
    return "\n".join([*parts, "", *_paired_lines(episodes, pairs)])


def default_pairs(agents: list[str]) -> list[tuple[str, str]]:
    """The comparisons a report makes: first each SAND agent against its compute-matched control (iter_k vs
    control_k: SAND's effect), then every agent against each agent before it in training order."""
    controls = [(f"iter_{a.removeprefix('control_')}", a) for a in agents if a.startswith("control_")]
    controls = [(a, b) for a, b in controls if a in agents]
    return [*controls, *((a, b) for i, a in enumerate(agents) for b in agents[:i] if (a, b) not in controls
                         and (b, a) not in controls)]


def paired_lines(store: Store, experiment: str) -> list[str]:
    """The report's closing lines: the `default_pairs`, pooled over all tasks, for each step share and last for
    the reward (`comparison_line`), each block under its heading."""
    episodes = _read(store, experiment)[0]
    return _paired_lines(episodes, default_pairs(_agents(episodes)))


def _paired_lines(episodes: pl.DataFrame, pairs: list[tuple[str, str]]) -> list[str]:
    lines = []
    for name, (label, _) in STEP_SHARES.items():
        lines += [f"share of steps x100 with {label}, paired:", *(comparison_line(episodes, a, b, name)
                                                                  for a, b in pairs), ""]
    return [*lines, "average reward x100, paired:", *(comparison_line(episodes, a, b) for a, b in pairs)]
