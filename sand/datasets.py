"""Dataset operations shared by the CLI and the Dagster assets: import, compose, export."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import polars as pl

from sand.envs.base import Environment
from sand.errors import SandError
from sand.formats import eto, resolve
from sand.store import Lineage, Store, WriteResult
from sand.trajectory import Trajectory, from_frame, to_frame

EXPERT = "expert"  # the curated expert set D_0


def import_dataset_name(path: str | Path) -> str:
    return f"import/{Path(path).stem}"


def import_eto(store: Store, path: str | Path, env: str, lineage: Lineage,
               open_env: Callable[[str], Environment] | None = None) -> WriteResult:
    """Validate a trajectory file (any format sand.formats.eto reads) and store it as source dataset
    `import/<file stem>`. All or nothing: every record, the size limits, the file's origin and its ids against
    every other source (so the expert set can be composed) are checked before anything is stored. With
    `open_env` (an environment by name), each trajectory's task is resolved and its replay verified first
    (sand.formats.resolve); without, they are marked pending (`resolve_imports` does it later)."""
    path = Path(path).resolve()
    trajectories = eto.load_eto(path, env)
    trajectories = resolve.resolve(trajectories, open_env) if open_env else resolve.pending(trajectories)
    dataset = import_dataset_name(path)
    lineage.metadata.setdefault("file", str(path))
    with store.lock(EXPERT):
        earlier = _imported_from(store, dataset)
        if earlier is not None and earlier != str(path):
            raise SandError(f"{path}: an import named '{dataset}' already came from {earlier}; rename the file "
                            "to add it beside that one (importing it again from its own path replaces it)")
        return _write_source(store, dataset, to_frame(trajectories), lineage)


def import_into_expert(store: Store, path: str | Path, env: str, lineage: Lineage,
                       open_env: Callable[[str], Environment] | None = None) -> tuple[WriteResult, WriteResult]:
    """`import_eto`, then `compose_expert`, as one step (a concurrent import waits): the import's and the new
    expert set's write results. What the `imported_trajectories` and `expert_trajectories` assets do in two runs,
    without Dagster."""
    with store.lock(EXPERT):
        return import_eto(store, path, env, lineage, open_env), compose_expert(store, lineage)


def resolve_imports(store: Store, open_env: Callable[[str], Environment], lineage: Lineage,
                    names: list[str] | None = None) -> list[WriteResult]:
    """Resolve and verify again the imported source datasets (`names`, default: every `import/...`), each
    stored as a new version when the outcome changed."""
    refs = [r for r in store.datasets("source_trajectories")
            if (r.dataset in names if names else r.dataset.startswith("import/"))]
    missing = sorted(set(names or ()) - {r.dataset for r in refs})
    if missing:
        imported = [r.dataset for r in store.datasets("source_trajectories") if r.dataset.startswith("import/")]
        raise SandError(f"no source datasets {missing}; imported ones: {imported}")
    written = []
    for ref in refs:
        trajectories = resolve.resolve(from_frame(store.read(ref.table, ref.dataset, ref.version)), open_env)
        step = Lineage(asset=lineage.asset, code_version=lineage.code_version, run_id=lineage.run_id,
                       inputs=[ref], metadata=dict(lineage.metadata))
        with store.lock(EXPERT):
            written.append(_write_source(store, ref.dataset, to_frame(trajectories), step))
    return written


def _imported_from(store: Store, dataset: str) -> str | None:
    """The file the current version of an imported dataset came from (None: not imported yet)."""
    ref = store.head("source_trajectories", dataset)
    if ref is None:
        return None
    rows = store.sql("select metadata from lineage where \"table\" = 'source_trajectories' and dataset = ? "
                     "and data_version = ? order by created_at desc limit 1", [dataset, ref.version])
    return json.loads(rows["metadata"][0]).get("file") if rows.height else None


def write_source(store: Store, dataset: str, trajectories: list[Trajectory], lineage: Lineage) -> WriteResult:
    if not trajectories:
        raise SandError(f"source '{dataset}' produced no trajectories")
    with store.lock(EXPERT):
        return _write_source(store, dataset, to_frame(trajectories), lineage)


def _write_source(store: Store, dataset: str, rows: pl.DataFrame, lineage: Lineage) -> WriteResult:
    """Store a source version once the expert set it would make composes (caller holds the lock)."""
    _expert_frames(store, replacing=(dataset, rows))
    return store.write("source_trajectories", dataset, rows, lineage)


def _expert_frames(store: Store, replacing: tuple[str, pl.DataFrame] | None = None):
    """The current source datasets (with `replacing` = (name, rows) in place of that source's head) and
    their rows, checked for trajectory ids that two sources share."""
    sources = [ref for ref in store.datasets("source_trajectories") if not replacing or ref.dataset != replacing[0]]
    frames = [(ref.dataset, store.read(ref.table, ref.dataset, ref.version)) for ref in sources]
    if replacing:
        frames.append(replacing)
    owner: dict[str, str] = {}
    for dataset, df in frames:
        for tid in df["id"]:
            if owner.setdefault(tid, dataset) != dataset:
                raise SandError(f"trajectory id {tid!r} is in both source datasets '{owner[tid]}' and "
                                f"'{dataset}'; rename one")
    return sources, [df for _, df in frames]


def compose_expert(store: Store, lineage: Lineage) -> WriteResult:
    """D_0 = the current version of every source dataset, as one curated dataset.

    Trajectory ids must be unique across sources: a clash names both datasets instead of letting
    one silently shadow the other (sources are checked before they are stored, so this holds). The
    lock makes reading the sources and moving D_0's head one step: concurrent imports never lose rows.
    """
    with store.lock(EXPERT):
        sources, frames = _expert_frames(store)
        if not sources:
            raise SandError("no source trajectories yet: materialize a source or run `sand import`")
        lineage.inputs = sources
        return store.write("trajectories", EXPERT, pl.concat(frames, how="vertical"), lineage)


def load_trajectories(store: Store, dataset: str = EXPERT, version: str | None = None,
                      table: str = "trajectories") -> list[Trajectory]:
    return from_frame(store.read(table, dataset, version))


def export_eto(store: Store, path: str | Path, dataset: str = EXPERT, env: str | None = None,
               table: str = "trajectories", strip: bool = False) -> tuple[Path, int]:
    """Write a dataset (optionally one environment's part) as an ETO file (`strip`: see eto.write_eto)."""
    trajectories = [t for t in load_trajectories(store, dataset, table=table) if env in (None, t.env)]
    if not trajectories:
        raise SandError(f"dataset '{dataset}' has no trajectories" + (f" for env '{env}'" if env else ""))
    return eto.write_eto(trajectories, path, strip), len(trajectories)

