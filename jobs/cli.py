"""The `sand` command: the engine's commands (sand.cli) and the two that need the Dagster definitions, `run` (a
job in this process, recorded in DAGSTER_HOME) and `ui` (dagster dev on this project)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from sand import cli


def cmd_run(args) -> None:
    from dagster import DagsterInstance

    from sand.report import format_report
    from sand.store import Store
    from sand_assets.definitions import defs, experiments

    job = defs.resolve_job_def(args.job)
    with DagsterInstance.get() as instance:
        result = job.execute_in_process(instance=instance, raise_on_error=False)
    print(f"run {result.run_id}: {'succeeded' if result.success else 'FAILED'} (job {args.job}; "
          f"DAGSTER_HOME={os.environ['DAGSTER_HOME']})")
    if args.job in {e.name for e in experiments}:
        print(format_report(Store(), args.job))
    if not result.success:
        raise SystemExit(1)


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
