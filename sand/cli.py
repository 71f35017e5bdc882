"""`sand`: import, export and query trajectory datasets, report on experiments. The installed `sand` command
(jobs.cli) adds the commands that need the Dagster definitions (`run`, `ui`) through `extend`."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from sand.config import apply_defaults
from sand.errors import SandError
from sand.trajectory import ENVS


def _store():
    from sand.store import Store

    return Store()


def cmd_import(args) -> None:
    """A plain import that writes the store directly, without Dagster (`python -m sand.cli import`); the installed
    `sand import` (jobs.cli) replaces it with Dagster's jobs, which record the import like an inbox one."""
    from sand import datasets
    from sand.formats import resolve
    from sand.store import Lineage

    store = _store()
    with store.lock(datasets.EXPERT):  # import and recompose as one step: a concurrent import waits
        imported = datasets.import_eto(store, args.path, args.env, Lineage(asset="cli:import"),
                                       open_env=None if args.no_resolve else resolve.open_env)
        expert = datasets.compose_expert(store, Lineage(asset="cli:import"))
    print(f"imported {imported.row_count} {args.env} trajectories from {args.path} as "
          f"'{imported.ref.dataset}' (version {imported.ref.version}{'' if imported.created else ', unchanged'})")
    _print_resolution(imported.rows)
    print(f"expert set: {expert.row_count} trajectories (version {expert.ref.version})")


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
    from sand.store import Lineage

    store = _store()
    written = datasets.resolve_imports(store, resolve.open_env, Lineage(asset="cli:resolve"), args.dataset or None)
    for w in written:
        print(f"'{w.ref.dataset}': version {w.ref.version}{'' if w.created else ' (unchanged)'}")
        _print_resolution(w.rows)
    if written:
        expert = datasets.compose_expert(store, Lineage(asset="cli:resolve"))
        print(f"expert set: {expert.row_count} trajectories (version {expert.ref.version})")


def cmd_export(args) -> None:
    from sand import datasets

    path, n = datasets.export_eto(_store(), args.path, dataset=args.dataset, env=args.env, table=args.table,
                                  strip=args.strip)
    print(f"wrote {n} trajectories to {path}")


def cmd_sql(args) -> None:
    import polars as pl

    df = _store().sql(args.query)
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

    print(format_report(_store(), args.experiment, vs=args.vs))


def build_parser(extend: Callable | None = None) -> argparse.ArgumentParser:
    """The engine's commands; `extend(subparsers)` adds more."""
    parser = argparse.ArgumentParser(prog="sand", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import", help="validate an ETO/ShareGPT file (JSON or JSONL) and add it to the expert set")
    p.add_argument("path")
    p.add_argument("--env", required=True, choices=ENVS)
    p.add_argument("--no-resolve", action="store_true",
                   help="skip matching each trajectory to its task and verifying it by replay (`sand resolve` "
                        "does it later); unresolved trajectories are trained on but never deliberated")
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
    if extend is not None:
        extend(sub)
    return parser


def main(argv: list[str] | None = None, extend: Callable | None = None) -> None:
    args = build_parser(extend).parse_args(argv)
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
