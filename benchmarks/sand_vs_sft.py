"""SFT vs SAND on the real small model: runs an experiment's job (default `cpu_bench`) and prints, per
env/split, the prompted base model, SFT (iteration 0) and every SAND iteration in one table, with the wall
time of each step.

    python benchmarks/sand_vs_sft.py [--experiment cpu_bench] [--report-only]

Runs record in SAND_HOME and DAGSTER_HOME like `sand run`; an interrupted run resumes on the next call
(finished checkpoints, evaluation episodes and loop work are kept). Cores are shared: the load average
is printed with the results.
"""
from __future__ import annotations

import argparse
import os
import time

from sand.config import apply_defaults
from sand.report import format_report
from sand.store import Store


def run(experiment: str) -> None:
    from dagster import DagsterInstance

    from sand_assets.definitions import defs

    job = defs.resolve_job_def(experiment)
    with DagsterInstance.get() as instance:
        started = time.monotonic()
        result = job.execute_in_process(instance=instance, raise_on_error=False)
        wall = time.monotonic() - started
        print(f"\n{experiment}: {'succeeded' if result.success else 'FAILED'} in {wall / 60:.1f} min "
              f"(run {result.run_id}, load average {os.getloadavg()[0]:.1f})")
        for step in sorted(instance.get_run_step_stats(result.run_id), key=lambda s: s.start_time or 0):
            seconds = (step.end_time or time.time()) - (step.start_time or time.time())
            print(f"  {step.step_key:<50}{step.status.value if step.status else '?':>10}{seconds / 60:>8.1f} min")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="cpu_bench")
    parser.add_argument("--report-only", action="store_true", help="print the table of what is already evaluated")
    args = parser.parse_args()
    apply_defaults()
    if not args.report_only:
        run(args.experiment)
    print()
    print(format_report(Store(), args.experiment))


if __name__ == "__main__":
    main()
