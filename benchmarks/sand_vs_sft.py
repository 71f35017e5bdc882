"""SFT vs SAND on the real small model (`cpu_bench`, second edition): the prompted base model, SFT, SAND
iterations 1 and 2, and iteration 1 without self-consistency sampling and without critique, each evaluated
greedily on the same 50 tasks of ALFWorld heldout and valid_unseen and ScienceWorld dev and test. Prints the
paper-style table (average reward x100 with its 95% bootstrap interval over episodes), each agent's paired
difference to SFT on the tasks both were evaluated on, and the wall time of every stage.

    python benchmarks/sand_vs_sft.py [--agents base,sft,iter_1,...] [--report-only]

The ablations are their own experiment files (cpu_bench_no_sampling, cpu_bench_no_critique) that differ from
cpu_bench only in the ablation switch: their D_0 share and SFT checkpoint are cpu_bench's (work is keyed by
content), and their agents are compared with cpu_bench's SFT agent on the same tasks (`sand report
cpu_bench_no_critique --vs sft` shows the same comparison from the catalog). `--agents` chooses what
runs (the cut when the budget binds; each agent's run includes whatever it stands on). Runs record in
SAND_HOME and DAGSTER_HOME like `sand run`; an interrupted run resumes on the next call (finished checkpoints,
evaluation episodes and loop work are kept), and each call appends its stage times to
SAND_HOME/benchmarks/sand_vs_sft-stages.jsonl, which the report prints whole. Cores are shared: the load
average is printed with the results.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass

import polars as pl
from results_page import chosen

from sand.config import apply_defaults
from sand.errors import SandError
from sand.stats import bootstrap_ci, paired_comparison
from sand.store import Store

EXPERIMENT = "cpu_bench"
ABLATION_SWITCHES = ("iterations", "self_consistency", "critique")  # what an ablation file may change in `sand`


@dataclass(frozen=True)
class Agent:
    label: str
    experiment: str
    agent: str  # the agent's name in `evaluations` of its experiment
    asset: str  # its evaluation asset, under the experiment's key prefix


AGENTS = {
    "base": Agent("base", EXPERIMENT, "base", "base_evaluation"),
    "sft": Agent("SFT", EXPERIMENT, "sft", "iter_0/evaluation"),
    "iter_1": Agent("SAND 1", EXPERIMENT, "iter_1", "iter_1/evaluation"),
    "iter_2": Agent("SAND 2", EXPERIMENT, "iter_2", "iter_2/evaluation"),
    "no_sampling": Agent("SAND 1 w/o sampling", f"{EXPERIMENT}_no_sampling", "iter_1", "iter_1/evaluation"),
    "no_critique": Agent("SAND 1 w/o critique", f"{EXPERIMENT}_no_critique", "iter_1", "iter_1/evaluation"),
}
BASELINE = "sft"
SPLITS = [("alfworld", "heldout"), ("alfworld", "valid_unseen"), ("sciworld", "dev"), ("sciworld", "test")]


def check_ablations(names: set[str]) -> None:
    """Ablation experiments must equal cpu_bench but for their switch, or they would not share its SFT agent
    and tasks (and the comparison would be unfair)."""
    from sand_assets.definitions import experiments

    by_name = {e.name: e for e in experiments}

    def common(name: str) -> dict:
        if name not in by_name:
            raise SandError(f"no experiment {name!r} in experiments/")
        settings = by_name[name].model_dump(exclude={"name", "description"})
        settings["sand"] = {k: v for k, v in settings["sand"].items() if k not in ABLATION_SWITCHES}
        return settings

    for name in names - {EXPERIMENT}:
        if common(name) != common(EXPERIMENT):
            raise SandError(f"experiments/{name}.yaml differs from {EXPERIMENT}.yaml beyond sand."
                            f"{{{', '.join(ABLATION_SWITCHES)}}}: align them, or its SFT agent is not {EXPERIMENT}'s")


def run(agents: list[str], stages_log) -> None:
    from dagster import AssetKey, AssetSelection, DagsterInstance

    from sand_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    experiments = list(dict.fromkeys(AGENTS[a].experiment for a in agents))
    check_ablations(set(experiments))
    with DagsterInstance.get() as instance:
        for experiment in experiments:
            job = defs.resolve_job_def(experiment)
            assets = [AGENTS[a].asset for a in agents if AGENTS[a].experiment == experiment]
            if experiment != EXPERIMENT:  # its SFT agent's evaluation (reused, not run again): its catalog
                assets.append(AGENTS[BASELINE].asset)  # then compares the ablation with SFT (`sand report`)
            targets = [AssetKey([experiment, *asset.split("/")]) for asset in assets]
            keys = AssetSelection.assets(*targets).upstream().resolve(graph) & job.asset_layer.selected_asset_keys
            started = time.monotonic()
            result = job.execute_in_process(instance=instance, asset_selection=sorted(keys), raise_on_error=False)
            wall = time.monotonic() - started
            print(f"\n{experiment}: {'succeeded' if result.success else 'FAILED'} in {wall / 60:.1f} min "
                  f"(run {result.run_id}, load average {os.getloadavg()[0]:.1f})")
            for step in sorted(instance.get_run_step_stats(result.run_id), key=lambda s: s.start_time or 0):
                seconds = (step.end_time or time.time()) - (step.start_time or time.time())
                status = step.status.value if step.status else "?"
                print(f"  {step.step_key:<50}{status:>10}{seconds / 60:>8.1f} min")
                stages_log.write(json.dumps({"run": result.run_id, "experiment": experiment, "step": step.step_key,
                                             "status": status, "seconds": round(seconds, 1),
                                             "load": round(os.getloadavg()[0], 1)}) + "\n")
                stages_log.flush()
            if not result.success:
                raise SystemExit(1)


def episodes(store: Store) -> pl.DataFrame:
    names = sorted({a.experiment for a in AGENTS.values()})
    return store.sql("select experiment, agent, env, split, task_id, reward, prompt_tokens + completion_tokens "
                     "as tokens, deliberation_steps, steps from evaluations where list_contains(?, experiment)",
                     params=[names])


def rewards(rows: pl.DataFrame, agent: Agent, env: str | None = None, split: str | None = None) -> dict:
    rows = rows.filter(experiment=agent.experiment, agent=agent.agent)
    if env is not None:
        rows = rows.filter(env=env, split=split)
    return {(r["env"], r["split"], r["task_id"]): r["reward"] for r in rows.sort("task_id").iter_rows(named=True)}


def report(store: Store) -> str:
    rows = episodes(store)
    present = [a for a in AGENTS.values() if rewards(rows, a)]
    if not present:
        return f"{EXPERIMENT}: no evaluations yet"
    header = "| agent | " + " | ".join(f"{e} {s}" for e, s in SPLITS) + " | avg | tokens/task | deliberation |"
    rule = "|---" * (len(SPLITS) + 4) + "|"
    table = [header, rule]
    for agent in present:
        cells = []
        for env, split in SPLITS:
            ci = bootstrap_ci(list(rewards(rows, agent, env, split).values()))
            cells.append(f"{ci.x100()} (n={ci.n})" if ci.n else "-")
        means = [bootstrap_ci(list(rewards(rows, agent, e, s).values())).mean for e, s in SPLITS]
        mine = rows.filter(experiment=agent.experiment, agent=agent.agent)
        avg = f"{100 * sum(means) / len(means):.1f}" if all(m == m for m in means) else "-"
        table.append(f"| {agent.label} | " + " | ".join(cells) + f" | {avg} | {mine['tokens'].mean():.0f} | "
                     f"{mine['deliberation_steps'].sum() / max(mine['steps'].sum(), 1):.2f} |")
    baseline = AGENTS[BASELINE]
    diffs = ["", f"paired difference to {baseline.label} (x100) [95% bootstrap interval], tasks won/lost/tied",
             "| agent | " + " | ".join(f"{e} {s}" for e, s in SPLITS) + " | all |", "|---" * (len(SPLITS) + 2) + "|"]
    lines = []
    if rewards(rows, baseline):
        for agent in present:
            if agent == baseline:
                continue
            cells = []
            for env, split in [*SPLITS, (None, None)]:
                p = paired_comparison(rewards(rows, agent, env, split), rewards(rows, baseline, env, split))
                cells.append(f"{p.x100()} {p.won}/{p.lost}/{p.tied}" if p.n else "-")
            diffs.append(f"| {agent.label} | " + " | ".join(cells) + " |")
            p = paired_comparison(rewards(rows, agent), rewards(rows, baseline))
            lines.append(f"{agent.label} vs {baseline.label}: {p.x100()} ({p.n} tasks, won/lost/tied "
                         f"{p.won}/{p.lost}/{p.tied})")
    return "\n".join([*table, *diffs, "", *lines])


def stage_times(path) -> str:
    """The latest wall time of every stage over all calls (a resumed call's skipped stages take seconds)."""
    if not path.exists() or path.stat().st_size == 0:  # no call has finished yet
        return ""
    rows = pl.read_ndjson(path)
    latest = rows.filter(pl.col("status") == "SUCCESS").group_by("experiment", "step").agg(
        pl.col("seconds").max(), pl.col("load").max())
    if latest.is_empty():
        return ""
    lines = ["", "stage wall times (the longest successful run of each, minutes; load average seen)"]
    lines += [f"  {e + ': ' + s:<70}{sec / 60:>7.1f}  (load {ld})"
              for e, s, sec, ld in latest.sort("experiment", "step").iter_rows()]
    lines.append(f"  {'total':<70}{latest['seconds'].sum() / 60:>7.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", default=",".join(AGENTS),
                        help=f"comma-separated agents to run (default: all: {','.join(AGENTS)})")
    parser.add_argument("--report-only", action="store_true", help="print the table of what is already evaluated")
    args = parser.parse_args()
    agents = chosen(parser, args.agents, AGENTS, "agents")
    apply_defaults()
    store = Store()
    log_path = store.home / "benchmarks" / "sand_vs_sft-stages.jsonl"
    if not args.report_only:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as stages_log:
            run(agents, stages_log)
    print()
    print(report(store))
    print(stage_times(log_path))


if __name__ == "__main__":
    main()
