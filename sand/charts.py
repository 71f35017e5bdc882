"""Charts of an experiment's scoreboard, drawn with matplotlib's object API (no display, no global state)."""
from __future__ import annotations

import os
from pathlib import Path

import polars as pl

# (column, axis label) of each panel; the first carries the 95% intervals as error bars.
PANELS = (("avg_reward", "average reward x100"), ("deliberation_rate", "deliberation rate (steps)"),
          ("tokens_per_task", "tokens per task"))


def scoreboard_chart(board: pl.DataFrame, path: Path, title: str) -> Path:
    """A PNG of `board` (sand.report.scoreboard): one panel per metric, agents in training order on the x
    axis, one line per env/split, reward with its interval. Written atomically to `path`."""
    from matplotlib.figure import Figure

    agents = list(dict.fromkeys(board["agent"]))
    splits = board.select("env", "split").unique(maintain_order=True).sort("env", "split").rows()
    fig = Figure(figsize=(4.2 * len(PANELS), 3.8), layout="constrained")
    fig.suptitle(title)
    spread = 0.3 / max(len(splits), 1)  # side by side, so error bars of equal agents do not hide each other
    for ax, (column, label) in zip(fig.subplots(1, len(PANELS)), PANELS, strict=True):
        for i, (env, split) in enumerate(splits):
            rows = {r["agent"]: r for r in board.filter(env=env, split=split).iter_rows(named=True)}
            shown = [a for a in agents if rows.get(a, {}).get(column) is not None]
            xs = [agents.index(a) + (i - (len(splits) - 1) / 2) * spread for a in shown]
            ys = [rows[a][column] for a in shown]
            errors = None
            if column == "avg_reward":
                errors = [[max(y - (rows[a]["ci_lo"] if rows[a]["ci_lo"] is not None else y), 0) for a, y in
                           zip(shown, ys)], [max((rows[a]["ci_hi"] if rows[a]["ci_hi"] is not None else y) - y, 0)
                                             for a, y in zip(shown, ys)]]
            ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=f"{env}/{split}")
        ax.set_xticks(range(len(agents)), agents)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(partial, format="png", dpi=100)
    partial.replace(path)
    return path
