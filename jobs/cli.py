"""`sand`: import, export and query trajectory datasets, run experiments as Dagster jobs, report on them, start
the UI. `run` and `import` run Dagster jobs in this process, recorded in DAGSTER_HOME (an import exactly like an
inbox import); the other commands read and write the store through the engine (sand/)."""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import nullcontext
from pathlib import Path

from sand.config import apply_defaults
from sand.errors import SandError
from sand.trajectory import ENVS

LAUNCHED_BY = "sand/launched_by"  # tags of a `sand run` run: which command, the process that runs it, the machine
PID = "sand/pid"
MACHINE = "sand/machine"


def cmd_run(args) -> None:
    from datetime import datetime

    from dagster import DagsterInstance

    from jobs.console import progress_hooks, quiet
    from jobs.retraining import failure_rows
    from sand.machine import machine_line
    from sand.preflight import check_experiment
    from sand.report import format_report
    from sand.store import Store
    from sand_assets.definitions import defs, experiments

    job = defs.resolve_job_def(args.job)
    experiment = next((e for e in experiments if e.name == args.job), None)
    store = Store()
    started = datetime.now()
    # Two runs of one job would race for the same work logs and checkpoints: a second is refused at once.
    holder = f"`sand run {args.job}` runs in pid {os.getpid()} since {started.isoformat(timespec='seconds')}"
    log_path = store.home / "logs" / f"{args.job}-{started.strftime('%Y%m%d-%H%M%S')}.log"
    with store.lock(f"run/{args.job}", holder=holder), DagsterInstance.get() as instance:
        _fail_abandoned_runs(instance, store, args.job)
        with quiet(log_path) if not args.verbose else nullcontext(sys.stdout) as out:
            if not args.verbose:
                print(f"sand run {args.job}: {len(job.nodes_in_topological_order)} stages on {machine_line()}; "
                      f"the full log is {log_path} (-v shows it here)", file=out, flush=True)
            if experiment is not None:
                check_experiment(experiment)  # Java, game data, base model (converted once): before any work
            result = job.with_hooks(progress_hooks(out, len(job.nodes_in_topological_order))).execute_in_process(
                instance=instance, raise_on_error=False,
                tags={LAUNCHED_BY: "sand run", PID: str(os.getpid()), MACHINE: machine_line()})
        print(f"run {result.run_id}: {'succeeded' if result.success else 'FAILED'} (job {args.job}; "
              f"DAGSTER_HOME={os.environ['DAGSTER_HOME']})")
        print(stage_times(instance, result.run_id))
        if not result.success:
            # Recorded here as well as by the daemon's run failure sensor (same file per run): a run
            # without a daemon reaches the catalog's run_failures too.
            rows = failure_rows(instance, instance.get_run_by_id(result.run_id), "the run failed")
            store.record_run_failure(result.run_id, rows)
            for row in rows:
                print(f"  failed: {row['step'] or 'the run'} {row['assets']}: {row['error']}", file=sys.stderr)
            if not args.verbose:
                print(f"  the full log: {log_path}", file=sys.stderr)
            raise SystemExit(1)
    if experiment is not None:
        print(format_report(store, args.job))


def stage_times(instance, run_id: str) -> str:
    """The run's steps in the order they started, each with its wall time and share of the run, and the machine."""
    run = instance.get_run_by_id(run_id)
    stats = sorted((s for s in instance.get_run_step_stats(run_id) if s.start_time and s.end_time),
                   key=lambda s: s.start_time)
    if not stats:
        return "stage times: no step ran"
    total = max(s.end_time for s in stats) - min(s.start_time for s in stats)
    width = max(len(s.step_key) for s in stats)
    lines = [f"stage times ({total / 60:.1f} min on {run.tags.get(MACHINE, 'this machine')}):"]
    for s in stats:
        seconds = s.end_time - s.start_time
        lines.append(f"  {s.step_key:<{width}} {seconds / 60:6.2f} min {100 * seconds / total:5.1f}%")
    return "\n".join(lines)


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


def cmd_import(args) -> None:
    """Partition `<env>/<file name>` of imported_trajectories from the file where it is (job import_eto, its run
    config naming the path), then expert_trajectories with its check (job compose_expert), in this process and
    recorded in DAGSTER_HOME; a rejected file fails the first run and stores nothing. `--direct`: the same import
    written by the engine alone, no Dagster run recorded. `--dry-run`: neither."""
    if args.dry_run:
        return _dry_run(args)
    if args.direct:
        return _import_direct(args)
    from dagster import DagsterInstance

    from jobs.expert_data import compose_expert_job, import_job
    from sand.store import Store
    from sand_assets.expert_data import eto_inbox_partitions

    path = Path(args.path).resolve()
    if not path.is_file():
        raise SandError(f"{path}: no such file")
    key = f"{args.env}/{path.name}"
    config = {"path": str(path), "resolve": not args.no_resolve}
    tags = {LAUNCHED_BY: "sand import", PID: str(os.getpid())}
    store = Store()
    with DagsterInstance.get() as instance:
        instance.add_dynamic_partitions(eto_inbox_partitions.name, [key])
        imported, import_run = _execute(instance, store, import_job.name, tags, partition_key=key,
                                        run_config={"ops": {"imported_trajectories": {"config": config}}})
        expert, expert_run = _execute(instance, store, compose_expert_job.name, tags)
    imported, expert = imported["imported_trajectories"], expert["expert_trajectories"]
    _print_import(args, imported["dataset"], imported["version"], imported["new_version"],
                  store.read("source_trajectories", imported["dataset"], imported["version"]),
                  expert["dagster/row_count"], expert["version"])
    print(f"runs: {import_job.name} {import_run} (partition {key}), {compose_expert_job.name} {expert_run} "
          f"(DAGSTER_HOME={os.environ['DAGSTER_HOME']})")


def _import_direct(args) -> None:
    from sand import datasets
    from sand.formats import resolve
    from sand.store import Lineage, Store

    imported, expert = datasets.import_into_expert(Store(), args.path, args.env, Lineage(asset="cli:import"),
                                                   open_env=None if args.no_resolve else resolve.open_env)
    _print_import(args, imported.ref.dataset, imported.ref.version, imported.created, imported.rows,
                  expert.row_count, expert.ref.version)


def _print_import(args, dataset: str, version: str, new: bool, rows, expert_rows: int, expert_version: str) -> None:
    """What an import stored (either path): the source dataset, its resolution, and the expert set it joined."""
    print(f"imported {rows.height} {args.env} trajectories from {args.path} as '{dataset}' "
          f"(version {version}{'' if new else ', unchanged'})")
    _print_resolution(rows)
    print(f"expert set: {expert_rows} trajectories (version {expert_version})")


DRY_RUN_RECORDS = 5


def _dry_run(args) -> None:
    """What an import of the file would store, before resolution: the whole file is read and validated, the first
    records are shown (task, steps, first action, and the instruction: a conversation read with its turns shifted
    shows an observation there), and neither the store nor Dagster is touched."""
    from sand.datasets import import_dataset_name
    from sand.formats import eto

    trajectories = eto.load_eto(args.path, args.env)
    print(f"dry run: {len(trajectories)} {args.env} trajectories from {args.path} would be imported as "
          f"'{import_dataset_name(args.path)}'; nothing was stored")
    for t in trajectories[:DRY_RUN_RECORDS]:
        print(f"  {t.id}: task {t.task}, {len(t.steps)} steps, first action {t.steps[0].action!r}")
        print(f"    instruction: {_shorten(t.instruction)}")
    if len(trajectories) > DRY_RUN_RECORDS:
        print(f"  ... and {len(trajectories) - DRY_RUN_RECORDS} more")


def _shorten(text: str, width: int = 160) -> str:
    """`text` on one line, its middle left out when long: a task sentence may open it (ScienceWorld) or end it
    (ALFWorld, after the room)."""
    text = " ".join(text.split())
    return text if len(text) <= width else f"{text[:width // 2 - 2]} ... {text[-(width // 2 - 3):]}"


def _execute(instance, store, job_name: str, tags: dict, **kwargs) -> tuple[dict[str, dict], str]:
    """Run job `job_name` of the definitions (resources bound) in this process: the metadata values of each
    asset it materialized, and its run id. A failed run is recorded in the catalog's run_failures and raises
    SandError with what failed (a Failure's description names the file and record)."""
    from jobs.retraining import failure_rows, innermost_error
    from sand_assets.definitions import defs

    # The console shows this command's lines, not Dagster's events (the run's event log keeps them all).
    quiet = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
    result = defs.resolve_job_def(job_name).execute_in_process(
        instance=instance, raise_on_error=False, tags=tags,
        run_config={**kwargs.pop("run_config", {}), **quiet}, **kwargs)
    if not result.success:
        store.record_run_failure(result.run_id, failure_rows(instance, instance.get_run_by_id(result.run_id),
                                                             "the run failed"))
        print(f"run {result.run_id}: FAILED (job {job_name}; DAGSTER_HOME={os.environ['DAGSTER_HOME']})",
              file=sys.stderr)
        failures = [e.step_failure_data for e in result.all_events if e.is_step_failure]
        raise SandError("; ".join((f.user_failure_data and f.user_failure_data.description) or innermost_error(f.error)
                                  for f in failures) or "the run failed")
    metadata = {event.asset_key.to_user_string(): {k: v.value for k, v in
                                                   event.step_materialization_data.materialization.metadata.items()}
                for event in result.get_asset_materialization_events()}
    return metadata, result.run_id


def cmd_ui(args) -> None:
    workspace = Path(__file__).resolve().parent.parent / "workspace.yaml"
    target = ["-w", str(workspace)] if workspace.exists() else ["-m", "sand_assets.definitions"]
    # This interpreter's own Dagster: `sand ui` must work without an activated virtual environment
    # (`dagster dev` starts its webserver and daemon from sys.executable too).
    os.execv(sys.executable, [sys.executable, "-m", "dagster", "dev", *target, "-p", str(args.port)])


def _print_resolution(rows) -> None:
    """How many of these imported trajectories (a stored frame) were matched, replayed faithfully, diverged,
    unmatched, per environment."""
    from sand.formats import resolve
    from sand.trajectory import from_frame

    for env, c in resolve.counts(from_frame(rows)).items():
        print(f"  {env}: matched {c['matched']}, replayed faithfully {c['replayed']}, diverged {c['diverged']}, "
              f"unmatched {c['unmatched']}")


def cmd_resolve(args) -> None:
    from sand import datasets
    from sand.formats import resolve
    from sand.store import Lineage, Store

    store = Store()
    written = datasets.resolve_imports(store, resolve.open_env, Lineage(asset="cli:resolve"), args.dataset or None)
    for w in written:
        print(f"'{w.ref.dataset}': version {w.ref.version}{'' if w.created else ' (unchanged)'}")
        _print_resolution(w.rows)
    if written:
        expert = datasets.compose_expert(store, Lineage(asset="cli:resolve"))
        print(f"expert set: {expert.row_count} trajectories (version {expert.ref.version})")


def cmd_export(args) -> None:
    from sand import datasets
    from sand.store import Store

    path, n = datasets.export_eto(Store(), args.path, dataset=args.dataset, env=args.env, table=args.table,
                                  strip=args.strip)
    print(f"wrote {n} trajectories to {path}")


def cmd_sql(args) -> None:
    import polars as pl

    from sand.store import Store

    df = Store().sql(args.query)
    if args.format == "csv":
        sys.stdout.write(df.write_csv())
    elif args.format == "json":
        sys.stdout.write(df.write_ndjson())
    else:
        with pl.Config(tbl_rows=args.max_rows, tbl_cols=-1, fmt_str_lengths=60, tbl_hide_dataframe_shape=True,
                       tbl_hide_column_data_types=True, tbl_hide_dtype_separator=True):
            print(df)


def cmd_report(args) -> None:
    from sand.report import format_report
    from sand.store import Store

    print(format_report(Store(), args.experiment, vs=args.vs))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sand", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import", help="validate a trajectory file (ETO/ShareGPT `conversations` or chat `messages`; "
                                      "JSON, JSONL or Parquet) and add it to the expert set")
    p.add_argument("path")
    p.add_argument("--env", required=True, choices=ENVS)
    p.add_argument("--no-resolve", action="store_true",
                   help="skip matching each trajectory to its task and verifying it by replay (`sand resolve` "
                        "does it later); unresolved trajectories are trained on but never deliberated")
    p.add_argument("--direct", action="store_true",
                   help="write the store through the engine alone, without recording Dagster runs")
    p.add_argument("--dry-run", action="store_true",
                   help=f"validate the file and print what would be stored for the first {DRY_RUN_RECORDS} records "
                        "(task, steps, first action); store nothing")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("resolve", help="match imported trajectories to their environment tasks again and verify "
                                       "them by replay (after new game files, or an import with --no-resolve)")
    p.add_argument("--dataset", action="append", help="an imported source dataset (repeatable; default: all)")
    p.set_defaults(func=cmd_resolve)

    p = sub.add_parser("export", help="write a trajectory dataset as an ETO file (.json or .jsonl)")
    p.add_argument("path")
    p.add_argument("--dataset", default="expert")
    p.add_argument("--table", default="trajectories", choices=["trajectories", "source_trajectories"])
    p.add_argument("--env", choices=ENVS)
    p.add_argument("--strip", action="store_true",
                   help="only ids and conversations, as ETO publishes data (no task id, split, source, reward; "
                        "ids become <env>_<n>)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("sql", help="query the catalog (views: trajectories, steps, lineage, ...)")
    p.add_argument("query")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--max-rows", type=int, default=50)
    p.set_defaults(func=cmd_sql)

    p = sub.add_parser("report", help="an experiment's scoreboard with 95%% bootstrap intervals, and paired "
                                      "comparisons of its agents (base, sft, iter_k) per env/split")
    p.add_argument("experiment", nargs="?", default="quickstart")
    p.add_argument("--vs", action="append", metavar="AGENT",
                   help="compare every agent with this one (repeatable; default: each with those before it)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("run", help="run a Dagster job in this process, recorded in DAGSTER_HOME")
    p.add_argument("job", nargs="?", default="quickstart")
    p.add_argument("-v", "--verbose", action="store_true", help="show the full log here (Dagster, libraries, JVMs)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("ui", help="start the Dagster UI (dagster dev) on this project")
    p.add_argument("--port", type=int, default=3000)
    p.set_defaults(func=cmd_ui)
    return parser



def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    apply_defaults()
    try:
        args.func(args)
    except SandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except BrokenPipeError:  # the reader went away (`sand sql ... | head`): stop quietly, as shell tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail again
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
