"""Results pages: a benchmark's printed table, kept in docs/results/ with the commit, machine and date it was
measured on. One page per benchmark and kind of machine (`<name>_<isa>.md`, e.g. generation_avx2.md), so the
numbers of an AVX2 machine and of an AVX-512 one stand side by side; a new run replaces its own page."""
from __future__ import annotations

import subprocess
import sys
from datetime import date
from pathlib import Path

from sand.machine import machine, machine_line

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"


def chosen(parser, text: str, known, what: str) -> list[str]:
    """The names in a comma-separated option, each one of `known` (else the parser's usage error)."""
    names = [n for n in text.split(",") if n]
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"unknown {what} {', '.join(unknown)}: choose from {', '.join(known)}")
    return names


class Report:
    """Prints lines as a benchmark measures them, and writes them to the benchmark's results page at the end."""

    def __init__(self, name: str, title: str):
        self.name, self.title, self.lines = name, title, []

    def print(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def write(self) -> Path:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=RESULTS.parent.parent).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=RESULTS.parent.parent).stdout.strip()
        path = RESULTS / f"{self.name}_{machine()['isa'].lower()}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join([
            f"# {self.title}", "",
            f"Written by `python benchmarks/{self.name}.py {' '.join(sys.argv[1:])}` on {date.today().isoformat()}, "
            f"commit {commit}{' (with uncommitted changes)' if dirty else ''}, on {machine_line()}.", "",
            "```text", *self.lines, "```", ""]))  # output, not commands to run
        print(f"written to {path}")
        return path
