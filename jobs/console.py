"""What `sand run` shows a person: one line per finished stage, while everything the libraries, Dagster and the
child processes (JVMs, vLLM) write goes to a log file under SAND_HOME (and the run's events to Dagster)."""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from dagster import DagsterEventType, HookContext, failure_hook, success_hook


@contextmanager
def quiet(log_path: Path) -> Iterator[TextIO]:
    """Send file descriptors 1 and 2 (Python logging, warnings, C++ and child processes alike) to `log_path` and
    yield a stream that still reaches the terminal. When sys.stdout is not the process's own (a test capturing
    it), output is left where it goes and the yielded stream is sys.stdout."""
    if sys.stdout is not sys.__stdout__ or sys.stderr is not sys.__stderr__:
        yield sys.stdout
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    out = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    with open(log_path, "ab") as log:
        for fd in (1, 2):
            os.dup2(log.fileno(), fd)
    try:
        yield out
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        out.close()


def progress_hooks(out: TextIO, total: int) -> set:
    """Hooks that print a line for each step as it ends: its number of `total`, name, minutes and what it wrote."""
    state = {"done": 0, "last": time.monotonic()}

    def line(context: HookContext, outcome: str) -> None:
        now = time.monotonic()
        state["done"] += 1
        wrote = []
        for record in context.instance.get_records_for_run(
                context.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION, limit=1000).records:
            entry = record.event_log_entry
            if entry.step_key == context.step_key:
                metadata = entry.asset_materialization.metadata
                rows = metadata.get("dagster/row_count")
                wrote.append(entry.asset_materialization.asset_key.to_user_string()
                             + (f" ({rows.value} rows)" if rows is not None else ""))
        print(f"[{state['done']:>2}/{total}] {context.step_key}: {outcome} in {(now - state['last']) / 60:.1f} min"
              + (f", wrote {', '.join(wrote)}" if wrote else ""), file=out, flush=True)
        state["last"] = now

    @success_hook(name="sand_progress_done")
    def done(context: HookContext) -> None:
        line(context, "done")

    @failure_hook(name="sand_progress_failed")
    def failed(context: HookContext) -> None:
        line(context, f"FAILED ({type(context.op_exception).__name__})")

    return {done, failed}
