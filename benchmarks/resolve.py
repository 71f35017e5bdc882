"""Task resolution and replay verification of imported data, on trajectories recorded here and stripped.

ScienceWorld: gold paths of the first --sciworld-variations train variations of every task; ALFWorld: the
observing expert on the first --alfworld-games valid_seen games (ALFWORLD_DATA). Both are exported as ETO
files without the platform's fields (`write_eto(strip=True)`: no task id, split, source or reward, neutral
ids), read back, and resolved (`sand.formats.resolve.resolve`). Printed per environment: trajectories,
matched to the task they were recorded in, matched elsewhere, unmatched, replayed faithfully, diverged, how
they matched, the time to build the index, and the resolution's wall time.

    SAND_HOME=$(mktemp -d) ALFWORLD_DATA=../shared/data/alfworld \\
        python benchmarks/resolve.py [--sciworld-variations 4] [--alfworld-games 140] [--envs alfworld]
"""
from __future__ import annotations

import argparse
import collections
import os
import tempfile
import time
from pathlib import Path


def open_env(name: str):
    """resolve.open_env's environments, with a JVM deadline that survives busy shared cores (a gold path can
    take over a minute to plan there)."""
    from sand.envs.alfworld import AlfWorldEnv
    from sand.envs.sciworld import ScienceWorldEnv

    return ScienceWorldEnv(call_timeout_s=900) if name == "sciworld" else AlfWorldEnv()


def record(env_name: str, limit: int):
    from sand.experts import record_experts

    with open_env(env_name) as env:
        if env_name == "sciworld":
            tasks = [t for name in env.task_names
                     for t in [t for t in env.tasks("train") if t.task == name][:limit]]
            source = "gold"
        else:
            tasks, source = env.tasks("valid_seen")[:limit], "observer"
        start = time.perf_counter()
        recorded = record_experts(env, tasks, source)
    print(f"{env_name}: recorded {len(recorded)} {source} trajectories in {time.perf_counter() - start:.0f} s",
          flush=True)
    return recorded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sciworld-variations", type=int, default=4, help="train variations per task (30 tasks)")
    parser.add_argument("--alfworld-games", type=int, default=140, help="valid_seen games")
    parser.add_argument("--envs", default="sciworld,alfworld", help="environments to measure, in order")
    args = parser.parse_args()
    if "SAND_HOME" not in os.environ:
        raise SystemExit("set SAND_HOME to a temporary folder")
    from sand.formats import eto, resolve

    limits = {"sciworld": args.sciworld_variations, "alfworld": args.alfworld_games}
    for env_name in args.envs.split(","):
        limit = limits[env_name]
        originals = record(env_name, limit)
        with tempfile.TemporaryDirectory() as tmp:
            path = eto.write_eto(originals, Path(tmp) / f"{env_name}.jsonl", strip=True)
            imported = eto.load_eto(path, env_name)
        start = time.perf_counter()
        with open_env(env_name) as env:
            resolve.RESOLVERS[env_name](env)  # builds and caches the index
        built = time.perf_counter() - start
        start = time.perf_counter()
        resolved = resolve.resolve(imported, open_env)
        took = time.perf_counter() - start
        right = sum((r.task_id, r.split) == (o.task_id, o.split) for r, o in zip(resolved, originals, strict=True))
        c = resolve.counts(resolved)[env_name]
        n = len(resolved)
        print(f"{env_name}: {n} trajectories; matched {c['matched']} ({100 * c['matched'] / n:.1f}%), to the "
              f"recorded task {right}, elsewhere {c['matched'] - right}; unmatched {c['unmatched']}; "
              f"replayed faithfully {c['replayed']} ({100 * c['replayed'] / n:.1f}%); diverged {c['diverged']}")
        print(f"{env_name}: how matched {dict(collections.Counter(r.resolution for r in resolved))}")
        diverged = [(o.task_id, r.diverged_at) for r, o in zip(resolved, originals) if r.replay == resolve.DIVERGED]
        if diverged:
            print(f"{env_name}: diverged (recorded task, step) {diverged[:10]}")
        print(f"{env_name}: index built in {built:.1f} s (environment start included); resolution took "
              f"{took:.1f} s ({took / n:.2f} s per trajectory, environment start included)", flush=True)
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
