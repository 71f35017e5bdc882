"""The `sand` command: the engine's commands (sand.cli) and the two that need the Dagster definitions, `run` (a
job in this process, recorded in DAGSTER_HOME) and `ui` (dagster dev on this project)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from sand import cli

LAUNCHED_BY = "sand/launched_by"  # tags of a `sand run` run: which command, and the process that runs it
PID = "sand/pid"


def cmd_run(args) -> None:
    from datetime import datetime

    from dagster import DagsterInstance

    from jobs.retraining import failure_rows
    from sand.preflight import check_experiment
    from sand.report import format_report
    from sand.store import Store
    from sand_assets.definitions import defs, experiments

    job = defs.resolve_job_def(args.job)
    experiment = next((e for e in experiments if e.name == args.job), None)
    if experiment is not None:
        check_experiment(experiment)  # Java, game data, base model: before any work starts
    store = Store()
    # Two runs of one job would race for the same work logs and checkpoints: a second is refused at once.
    holder = f"`sand run {args.job}` runs in pid {os.getpid()} since {datetime.now().isoformat(timespec='seconds')}"
    with store.lock(f"run/{args.job}", holder=holder), DagsterInstance.get() as instance:
        _fail_abandoned_runs(instance, store, args.job)
        result = job.execute_in_process(instance=instance, raise_on_error=False,
                                        tags={LAUNCHED_BY: "sand run", PID: str(os.getpid())})
        print(f"run {result.run_id}: {'succeeded' if result.success else 'FAILED'} (job {args.job}; "
              f"DAGSTER_HOME={os.environ['DAGSTER_HOME']})")
        if not result.success:
            # Recorded here as well as by the daemon's run failure sensor (same file per run): a run
            # without a daemon reaches the catalog's run_failures too.
            rows = failure_rows(instance, instance.get_run_by_id(result.run_id), "the run failed")
            store.record_run_failure(result.run_id, rows)
            for row in rows:
                print(f"  failed: {row['step'] or 'the run'} {row['assets']}: {row['error']}", file=sys.stderr)
            raise SystemExit(1)
    if experiment is not None:
        print(format_report(store, args.job))


def _fail_abandoned_runs(instance, store, job: str) -> None:
    """Mark failed the runs of `job` that an earlier `sand run` left started: this process holds the job's lock,
    so the process that ran them is gone (killed before it could record an end)."""
    from dagster import DagsterRunStatus, RunsFilter

    from jobs.retraining import failure_rows

    unfinished = [DagsterRunStatus.STARTED, DagsterRunStatus.STARTING, DagsterRunStatus.NOT_STARTED]
    for run in instance.get_runs(RunsFilter(job_name=job, statuses=unfinished, tags={LAUNCHED_BY: "sand run"})):
        message = f"abandoned: its `sand run` process (pid {run.tags.get(PID, '?')}) ended before the run did"
        instance.report_run_failed(run, message)
        store.record_run_failure(run.run_id, failure_rows(instance, instance.get_run_by_id(run.run_id), message))
        print(f"marked run {run.run_id} failed: {message}", file=sys.stderr)


def cmd_ui(args) -> None:
    workspace = Path(__file__).resolve().parent.parent / "workspace.yaml"
    target = ["-w", str(workspace)] if workspace.exists() else ["-m", "sand_assets.definitions"]
    # This interpreter's own Dagster: `sand ui` must work without an activated virtual environment
    # (`dagster dev` starts its webserver and daemon from sys.executable too).
    os.execv(sys.executable, [sys.executable, "-m", "dagster", "dev", *target, "-p", str(args.port)])


def add_commands(sub) -> None:
    p = sub.add_parser("run", help="run a Dagster job in this process, recorded in DAGSTER_HOME")
    p.add_argument("job", nargs="?", default="quickstart")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("ui", help="start the Dagster UI (dagster dev) on this project")
    p.add_argument("--port", type=int, default=3000)
    p.set_defaults(func=cmd_ui)


def main(argv: list[str] | None = None) -> None:
    cli.main(argv, extend=add_commands)


if __name__ == "__main__":
    main()
