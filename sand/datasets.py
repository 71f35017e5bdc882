"""Dataset operations shared by the CLI and the Dagster assets: import, compose, export."""
from __future__ import annotations

from pathlib import Path

import polars as pl

from sand.errors import SandError
from sand.formats import eto
from sand.store import Lineage, Store, WriteResult
from sand.trajectory import Trajectory, from_frame, to_frame

EXPERT = "expert"  # the curated expert set D_0


def import_dataset_name(path: str | Path) -> str:
    return f"import/{Path(path).stem}"


def import_eto(store: Store, path: str | Path, env: str, lineage: Lineage) -> WriteResult:
    """Validate an ETO file and store it as source dataset `import/<file stem>`. All or nothing."""
    trajectories = eto.load_eto(path, env)
    lineage.metadata.setdefault("file", str(Path(path).resolve()))
    return store.write("source_trajectories", import_dataset_name(path), to_frame(trajectories), lineage)


def write_source(store: Store, dataset: str, trajectories: list[Trajectory], lineage: Lineage) -> WriteResult:
    if not trajectories:
        raise SandError(f"source '{dataset}' produced no trajectories")
    return store.write("source_trajectories", dataset, to_frame(trajectories), lineage)


def compose_expert(store: Store, lineage: Lineage) -> WriteResult:
    """D_0 = the current version of every source dataset, as one curated dataset.

    Trajectory ids must be unique across sources: a clash names both datasets instead of letting
    one silently shadow the other.
    """
    sources = store.datasets("source_trajectories")
    if not sources:
        raise SandError("no source trajectories yet: materialize a source or run `sand import`")
    frames, owner = [], {}
    for ref in sources:
        df = store.read(ref.table, ref.dataset, ref.version)
        for tid in df["id"]:
            if tid in owner:
                raise SandError(f"trajectory id {tid!r} is in both source datasets "
                                f"'{owner[tid]}' and '{ref.dataset}'; rename one")
            owner[tid] = ref.dataset
        frames.append(df)
    lineage.inputs = sources
    return store.write("trajectories", EXPERT, pl.concat(frames, how="vertical"), lineage)


def load_trajectories(store: Store, dataset: str = EXPERT, version: str | None = None,
                      table: str = "trajectories") -> list[Trajectory]:
    return from_frame(store.read(table, dataset, version))


def export_eto(store: Store, path: str | Path, dataset: str = EXPERT, env: str | None = None,
               table: str = "trajectories") -> tuple[Path, int]:
    """Write a dataset (optionally one environment's part) as an ETO file."""
    trajectories = [t for t in load_trajectories(store, dataset, table=table) if env in (None, t.env)]
    if not trajectories:
        raise SandError(f"dataset '{dataset}' has no trajectories" + (f" for env '{env}'" if env else ""))
    return eto.write_eto(trajectories, path), len(trajectories)

