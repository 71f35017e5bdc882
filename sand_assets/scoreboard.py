"""`<exp>/scoreboard`: whether SAND helped, in the UI. Agents (base, sft, iter_k) x env/split with 95% intervals,
paired comparisons with the SFT agent, a chart, and numeric metadata named `<agent>/<env>/<split>/<metric>` in
every materialization, so the asset's Plots tab follows each figure over time."""

import base64

import polars as pl
from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    AutomationCondition,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    asset,
)

from resources import StoreResource
from sand.charts import scoreboard_chart
from sand.experiment import Experiment
from sand.report import comparisons, paired_lines, scoreboard
from sand.store import content_hash
from sand.versioning import code_version

NUMERIC = ("avg_reward", "ci_lo", "ci_hi", "success_rate", "deliberation_rate", "tokens_per_task", "episodes")


def evaluation_keys(exp: Experiment) -> list[AssetKey]:
    """Every evaluation asset of `exp`: the base model, SFT (iteration 0), each SAND iteration and its control."""
    controls = range(1, exp.sand.iterations + 1) if exp.sand.control else ()
    return [AssetKey([exp.name, "base_evaluation"]),
            *(AssetKey([exp.name, f"iter_{k}", "evaluation"]) for k in range(exp.sand.iterations + 1)),
            *(AssetKey([exp.name, f"iter_{k}", "control_evaluation"]) for k in controls)]


def _markdown_table(df: pl.DataFrame) -> str:
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True,
                   tbl_hide_dtype_separator=True, tbl_formatting="MARKDOWN", fmt_str_lengths=60):
        return str(df)


def _by_split(board: pl.DataFrame, cell: pl.Expr) -> str:
    """Agents as rows (training order), env/split as columns."""
    cells = board.select("agent", pl.concat_str("env", pl.lit("/"), "split").alias("split"), cell.alias("cell"))
    return _markdown_table(cells.pivot(on="split", index="agent", values="cell", sort_columns=True))


def scoreboard_markdown(board: pl.DataFrame, versus: pl.DataFrame, chart_png: bytes, experiment: str,
                        paired: list[str] = ()) -> str:
    image = base64.b64encode(chart_png).decode()
    parts = [f"## {experiment}: average reward x100 [95% bootstrap interval]", "",
             _by_split(board, pl.format("{} [{}, {}]", "avg_reward", "ci_lo", "ci_hi")), "",
             f"![{experiment} scoreboard](data:image/png;base64,{image})", ""]
    if not versus.is_empty():
        parts += ["## against sft: mean difference x100 [95% paired interval], tasks won/lost/tied", "",
                  _by_split(versus, pl.format("{} [{}, {}] {}/{}/{}", "mean_diff", "lo", "hi", "won", "lost", "tied")),
                  ""]
    if paired:  # over all tasks: `agent vs baseline: +x [lo, hi] (n tasks, won/lost/tied)`, a block per measure
        parts += ["## paired comparisons over all tasks", "", "```", *paired, "```", ""]
    for metric in ("deliberation_rate", "tokens_per_task", "success_rate", "episodes"):
        parts += [f"## {metric}", "", _by_split(board, pl.col(metric)), ""]
    return "\n".join(parts)


def build_scoreboard_asset(exp: Experiment) -> AssetsDefinition:
    @asset(key=AssetKey([exp.name, "scoreboard"]), group_name=exp.name, deps=evaluation_keys(exp), kinds={"python"},
           code_version=code_version("sand.report", "sand.stats", "sand.charts"),
           # Follows every evaluation that lands, also those materialized one at a time from the UI.
           automation_condition=AutomationCondition.eager().without(~AutomationCondition.any_deps_missing()),
           description=f"{exp.name}'s agents side by side: reward per split with 95% intervals, paired "
                       "comparisons with the SFT agent, deliberation rate and tokens per task, and a chart.")
    def scoreboard_asset(context: AssetExecutionContext, store: StoreResource) -> MaterializeResult:
        db = store.store()
        board = scoreboard(db, exp.name)
        if board.is_empty():
            context.log.warning(f"{exp.name}: no evaluations yet")
            return MaterializeResult(data_version=DataVersion("empty"),
                                     metadata={"scoreboard": MetadataValue.md(f"{exp.name}: no evaluations yet")})
        agents = set(board["agent"])
        versus = comparisons(db, exp.name, "sft") if "sft" in agents else pl.DataFrame()
        version = content_hash(board)
        chart = scoreboard_chart(board, db.home / "reports" / exp.name / f"scoreboard_{version}.png",
                                 f"{exp.name}: agents in training order")
        numbers = {f"{r['agent']}/{r['env']}/{r['split']}/{m}": r[m] for r in board.iter_rows(named=True)
                   for m in NUMERIC if r[m] is not None}
        return MaterializeResult(data_version=DataVersion(version), metadata={
            "scoreboard": MetadataValue.md(scoreboard_markdown(board, versus, chart.read_bytes(), exp.name,
                                                               paired_lines(db, exp.name))),
            "chart": MetadataValue.path(str(chart)), "agents": len(agents), **numbers})

    return scoreboard_asset
