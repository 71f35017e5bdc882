"""SAND's open choices, each against its compute-matched control, on the quickstart's protocol: SmolLM2-135M,
the 8 short ScienceWorld task types, greedy episodes on one unseen variation of each in dev and test (16 tasks).

Each variant is experiments/quickstart.yaml with the settings of VARIANTS changed; it runs as its own experiment
(`variant_<name>`, written to SAND_HOME/benchmarks/variants/ and loaded through SAND_EXPERIMENTS), so its D_0, SFT
agent and SFT evaluation are the quickstart's (work is keyed by content), and so is its control where its step
count is the same. Per variant it prints D_1's deliberations, SAND 1's and its control's mean reward x100 with
95% bootstrap intervals over the 16 tasks, SAND 1's paired difference to its control and to SFT (won/lost/tied),
and the share of SAND 1's evaluation steps that deliberate; then writes docs/results/variants_<isa>.md.

    python benchmarks/variants.py [--variants default,separated,...] [--report-only]

A variant's run resumes where an interrupted one stopped (finished stages and episodes are kept).
"""
from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from results_page import Report, chosen

from sand.config import apply_defaults, sand_home
from sand.stats import bootstrap_ci, paired_comparison
from sand.store import Store

QUICKSTART = Path(__file__).resolve().parent.parent / "experiments" / "quickstart.yaml"
# name -> (settings changed from the quickstart, what the variant tests)
VARIANTS: dict[str, tuple[dict, str]] = {
    "default": ({}, "the quickstart as it ships: 4 of the 16 gold paths deliberated"),
    "all_trajectories": ({"sand": {"trajectories": {"sciworld": None}}}, "all 16 gold paths deliberated"),
    "all_outcome": ({"sand": {"trajectories": {"sciworld": None}, "thought_form": "outcome"}},
                    "all 16 deliberated; evidence-written thoughts state outcomes, quote no observation"),
    "separated": ({"sand": {"deliberate": "separated"}},
                  "deliberate only where executing the candidates told them apart"),
    "outcome": ({"sand": {"thought_form": "outcome"}}, "evidence-written thoughts state outcomes, quote nothing"),
    "two_epochs": ({"train": {"iteration_epochs": [2]}}, "the SAND round (and its control) trains two epochs"),
    "all_outcome_3ep": ({"sand": {"trajectories": {"sciworld": None}, "thought_form": "outcome"},
                         "train": {"iteration_epochs": [3]}},
                        "all_outcome, the SAND round (and its control) training three epochs, as the paper's first"),
}


def merged(base: dict, changes: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        out[key] = merged(out.get(key) or {}, value) if isinstance(value, dict) and value else value
    return out


def write_experiments(folder: Path) -> None:
    base = yaml.safe_load(QUICKSTART.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    for name, (changes, what) in VARIANTS.items():
        settings = merged(base, changes)
        settings["description"] = f"quickstart variant: {what}"
        (folder / f"variant_{name}.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))


def run(names: list[str], folder: Path) -> None:
    env = {**os.environ, "SAND_EXPERIMENTS": str(folder)}
    for name in names:
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "jobs.cli", "run", f"variant_{name}"], env=env,
                              cwd=QUICKSTART.parent.parent)
        print(f"variant {name}: {'done' if done.returncode == 0 else 'FAILED'} in "
              f"{(time.monotonic() - started) / 60:.1f} min", flush=True)
        if done.returncode != 0:
            raise SystemExit(done.returncode)


def rewards(rows, agent: str) -> dict:
    return {(r["split"], r["task_id"]): r["reward"] for r in rows.filter(agent=agent).iter_rows(named=True)}


def rate(rows, agent: str) -> str:
    """The share of an agent's evaluation steps whose thought deliberates."""
    mine = rows.filter(agent=agent)
    return f"{mine['deliberation_steps'].sum() / max(mine['steps'].sum(), 1):.3f}" if mine.height else "-"


def paired(a: dict, b: dict) -> str:
    p = paired_comparison(a, b)
    return f"{p.x100()} ({p.won}/{p.lost}/{p.tied})" if p.n else "-"


def mean(values: dict) -> str:
    return bootstrap_ci(list(values.values())).x100()


def report(names: list[str], out: Report) -> None:
    store = Store()
    out.print("| variant | D_1 deliberations (fallbacks) | SAND 1 | control 1 | SAND 1 - control 1 (won/lost/tied) "
              "| SAND 1 - SFT | deliberation rate SAND 1 (control) | train steps |")
    out.print("|---|---|---|---|---|---|---|---|")
    for name in names:
        exp = f"variant_{name}"
        rows = store.sql("select agent, split, task_id, reward, deliberation_steps, steps from evaluations "
                         "where experiment = ? order by task_id", params=[exp])
        if rows.is_empty():
            out.print(f"| {name} | not run | | | | | | |")
            continue
        made = (store.sql("select count(*) as n, count(*) filter (where fallback) as fallbacks from deliberations "
                          "where dataset = ?", params=[f"{exp}/iter_1"]).row(0, named=True)
                if store.head("deliberations", f"{exp}/iter_1") else {"n": 0, "fallbacks": 0})

        steps = store.sql("select dataset, train_steps from checkpoints where list_contains(?, dataset)",
                          params=[[f"{exp}/iter_1", f"{exp}/control_1"]])
        by = {r["dataset"].rsplit("/", 1)[1]: r["train_steps"] for r in steps.iter_rows(named=True)}
        sand, control, sft = rewards(rows, "iter_1"), rewards(rows, "control_1"), rewards(rows, "sft")
        out.print(f"| {name} | {made['n']} ({made['fallbacks']}) | {mean(sand)} | {mean(control)} | "
                  f"{paired(sand, control)} | {paired(sand, sft)} | "
                  f"{rate(rows, 'iter_1')} ({rate(rows, 'control_1')}) | "
                  f"{by.get('iter_1', '-')} / {by.get('control_1', '-')} |")
    out.print()
    for name in names:
        out.print(f"{name}: {VARIANTS[name][1]}")
    out.print("Rewards x100 over the 16 tasks (one unseen variation of each of 8 task types in dev and in test), "
              "95% bootstrap intervals; paired differences on the same tasks.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--report-only", action="store_true", help="print the table of what has run")
    args = parser.parse_args()
    names = chosen(parser, args.variants, VARIANTS, "variants")
    apply_defaults()
    folder = sand_home() / "benchmarks" / "variants"
    write_experiments(folder)
    if not args.report_only:
        run(names, folder)
    out = Report("variants", "SAND variants against their compute-matched controls (quickstart protocol)")
    report(names, out)
    out.write()


if __name__ == "__main__":
    main()
