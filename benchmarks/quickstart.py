"""The README's main job, timed as a user runs it: `.venv/bin/sand run quickstart` in SAND_HOME (in an empty one,
every stage runs), everything it prints kept on a results page (docs/results/quickstart_<isa>.md), and its
scoreboard's average rewards and paired rewards written into README.md between the quickstart markers.

    SAND_HOME=$(mktemp -d) .venv/bin/python benchmarks/quickstart.py
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

from results_page import Report

from sand.config import apply_defaults, sand_home

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
BEGIN, END = "<!-- quickstart scoreboard (benchmarks/quickstart.py) -->", "<!-- end of quickstart scoreboard -->"


def scoreboard_block(printed: list[str]) -> list[str]:
    """From `sand run`'s output: the average-reward table and the paired average rewards."""
    def block(title: str) -> list[str]:
        start = next(i for i, line in enumerate(printed) if line.startswith(title))
        end = next((i for i in range(start, len(printed)) if not printed[i].strip()), len(printed))
        return printed[start:end]
    return [*block("avg_reward x100"), "", *block("average reward x100, paired:")]


def write_readme(lines: list[str], page: Path) -> None:
    text = README.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{README}: no quickstart markers ({BEGIN} ... {END})")
    block = "\n".join([BEGIN, "```text", *lines, "```", f"(from [{page.relative_to(REPO)}]"
                       f"({page.relative_to(REPO)}), which has the whole output and the machine)", END])
    README.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    apply_defaults()
    home = sand_home()
    out = Report("quickstart", "`sand run quickstart`, as a user runs it")
    if any((home / "datasets").glob("*/*")):
        out.print(f"note: {home} already held datasets; stages found done there took seconds")
    sand = Path(sys.executable).parent / "sand"  # the installed command, as the README runs it
    run = subprocess.Popen([str(sand), "run", "quickstart"], cwd=REPO, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in run.stdout:
        out.print(line.rstrip("\n").replace(f"{REPO}/", ""))  # paths as the repository's, not this machine's
    if run.wait():
        raise SystemExit(run.returncode)
    page = out.write()
    write_readme(scoreboard_block(out.lines), page)
    print(f"README.md: the scoreboard block now comes from {page.name}")


if __name__ == "__main__":
    main()
