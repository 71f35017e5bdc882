"""The store: versioned Parquet datasets under SAND_HOME and the DuckDB catalog over them.

Layout (all paths under SAND_HOME):
  datasets/<table>/<dataset>/<version>.parquet  one immutable file per dataset version
  datasets/<table>/_schema/empty.parquet         zero rows, full schema: views work before any data
  heads/<table>/<dataset>.parquet                which version of a dataset is current (a pointer)
  lineage/<day>/<time>-<version>.parquet         one row per materialization
  run_failures/<day>/<run id>.parquet            one row per failed step of a failed Dagster run
  locks/<name>.lock                              cross-process locks (fcntl) around read-modify-writes
  catalog.duckdb                                 views over the globs above, for outside tools

A version is the content hash of the rows, so writing the same rows twice is a no-op (no new file,
no lineage row) and a changed dataset gets a new file beside the old one. Files are written to a
temporary name and renamed, so readers never see half a file and a failed write leaves what was
stored untouched. Paths stored in rows (checkpoint folders, lineage) are relative to SAND_HOME, so a
home can be moved or copied; `read` resolves them.

Readers (`sql`, `connect`) never open catalog.duckdb: they declare the same views in an in-memory
DuckDB whose file access is confined to SAND_HOME and locked, and run only SELECT statements. So a
query cannot write, attach or read outside the home, and no reader ever waits on the catalog file's
lock or on a damaged catalog. The catalog file is declared by writers only (`declare_catalog`, after
every write), rebuilt from scratch when someone has replaced or broken it; it holds no data.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import duckdb
import polars as pl

from sand.config import sand_home
from sand.errors import SandError
from sand.schemas import (
    AGENT_COMPARISON_SQL,
    DATASET_REF,
    EVALUATION_SUMMARY_SQL,
    RESOLUTION_SUMMARY_SQL,
    TABLES,
)

HEAD_SCHEMA = {"table": pl.Utf8, "dataset": pl.Utf8, "version": pl.Utf8, "updated_at": pl.Datetime("us", "UTC")}

LINEAGE_SCHEMA = {
    "asset": pl.Utf8,  # the Dagster asset key (or CLI command) that produced the rows
    "table": pl.Utf8,
    "dataset": pl.Utf8,
    "iteration": pl.Int32,
    "data_version": pl.Utf8,
    "code_version": pl.Utf8,
    "run_id": pl.Utf8,
    "inputs": pl.List(DATASET_REF),
    "row_count": pl.Int64,
    "path": pl.Utf8,
    "metadata": pl.Utf8,  # JSON: anything else worth keeping (model hash, config, ...)
    "created_at": pl.Datetime("us", "UTC"),
}

RUN_FAILURE_SCHEMA = {
    "run_id": pl.Utf8,
    "job": pl.Utf8,
    "step": pl.Utf8,  # null: the run failed outside any step (launch, run worker)
    "assets": pl.List(pl.Utf8),  # what the failed step was materializing
    "error": pl.Utf8,  # the innermost error: the user's exception, not Dagster's wrapper
    "failed_at": pl.Datetime("us", "UTC"),
}


@dataclass(frozen=True)
class DatasetRef:
    table: str
    dataset: str
    version: str


@dataclass
class Lineage:
    """Who wrote a dataset version and from what."""

    asset: str
    code_version: str = ""
    run_id: str | None = None
    iteration: int | None = None
    inputs: list[DatasetRef] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class WriteResult:
    ref: DatasetRef
    path: Path
    rows: pl.DataFrame  # the stored rows (schema columns, without dataset/version)
    created: bool  # False when this exact content was already stored

    @property
    def row_count(self) -> int:
        return self.rows.height


def content_hash(df: pl.DataFrame) -> str:
    """A hash of the rows' content, independent of row order and of the Parquet encoding."""
    digest = hashlib.sha256(json.dumps(list(df.columns)).encode())
    for line in sorted(json.dumps(r, sort_keys=True, default=str) for r in df.iter_rows(named=True)):
        digest.update(line.encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def atomic_write(df: pl.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        df.write_parquet(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _folder(name: str) -> str:
    """Dataset names may contain '/', folder names may not."""
    return quote(name, safe="")


# Columns that hold paths, stored relative to SAND_HOME when they point inside it.
PATH_COLUMNS = {"checkpoints": ("path", "init_checkpoint", "base_model")}

# Statements a reader may run: queries only (a COPY could still write inside SAND_HOME).
_READ_STATEMENTS = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}

_held = threading.local()  # lock files this thread holds, so a holder may re-enter its own lock


class Store:
    def __init__(self, home: Path | str | None = None):
        self.home = Path(home).resolve() if home else sand_home()
        self.home.mkdir(parents=True, exist_ok=True)
        for table, schema in TABLES.items():
            self._ensure_empty(self.home / "datasets" / table / "_schema" / "empty.parquet",
                               {**schema, "dataset": pl.Utf8, "version": pl.Utf8})
        self._ensure_empty(self.home / "heads" / "_schema" / "empty.parquet", HEAD_SCHEMA)
        self._ensure_empty(self.home / "lineage" / "_schema" / "empty.parquet", LINEAGE_SCHEMA)
        self._ensure_empty(self.home / "run_failures" / "_schema" / "empty.parquet", RUN_FAILURE_SCHEMA)

    @staticmethod
    def _ensure_empty(path: Path, schema: dict) -> None:
        if not path.exists():
            atomic_write(pl.DataFrame(schema=schema), path)

    @property
    def catalog_path(self) -> Path:
        return self.home / "catalog.duckdb"

    @contextmanager
    def lock(self, name: str, holder: str | None = None):
        """Hold the exclusive lock `name` across processes and threads (re-entrant in one thread).

        Any read-modify-write of a dataset (read the sources, recompose, move the head) holds it, so two
        writers never both read the old state and the later one drops the other's rows. With `holder` (a line
        saying who holds it) the lock is not waited for: while another process holds it, SandError quotes
        that process's holder line."""
        path = self.home / "locks" / f"{_folder(name)}.lock"
        held = _held.__dict__.setdefault("paths", set())
        if path in held:
            yield
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (fcntl.LOCK_NB if holder is not None else 0))
            except BlockingIOError:
                f.seek(0)
                raise SandError(f"'{name}' is held by another process: {f.read().strip() or 'unknown'}") from None
            if holder is not None:
                f.truncate(0)
                f.write(holder + "\n")
                f.flush()
            held.add(path)
            try:
                yield
            finally:
                held.discard(path)
                fcntl.flock(f, fcntl.LOCK_UN)

    def relative(self, path: str | Path) -> str:
        """`path` relative to SAND_HOME when it lies inside it, else unchanged (absolute)."""
        path = Path(path)
        if not path.is_absolute():  # stored relative already
            return str(path)
        try:
            return str(path.resolve().relative_to(self.home))
        except ValueError:
            return str(path)

    def resolve(self, path: str | Path) -> Path:
        """A path as stored in the catalog, made absolute against this home."""
        return self.home / path

    # --- writing -------------------------------------------------------------------------------

    def write(self, table: str, dataset: str, df: pl.DataFrame, lineage: Lineage) -> WriteResult:
        """Store `df` as a version of `dataset`, make it the dataset's head, and record lineage."""
        schema = self._schema(table)
        missing = [c for c in schema if c not in df.columns]
        if missing:
            raise SandError(f"table '{table}': rows lack columns {missing}")
        if not dataset or dataset.startswith("_"):
            raise SandError(f"invalid dataset name {dataset!r}")
        rows = df.select([pl.col(c).cast(t) for c, t in schema.items()])
        rows = rows.with_columns([pl.col(c).map_elements(self.relative, return_dtype=pl.Utf8)
                                  for c in PATH_COLUMNS.get(table, ())])
        ref = DatasetRef(table, dataset, content_hash(rows))
        path = self.path(ref)
        created = not path.exists()
        if not created and self.head(table, dataset) == ref:  # a rerun that changed nothing records nothing
            return WriteResult(ref, path, self._resolved(table, rows), False)
        if created:
            atomic_write(rows.with_columns(dataset=pl.lit(dataset), version=pl.lit(ref.version)), path)
        now = datetime.now(timezone.utc)
        atomic_write(pl.DataFrame([{"table": table, "dataset": dataset, "version": ref.version, "updated_at": now}],
                                   schema=HEAD_SCHEMA),
                      self.home / "heads" / table / f"{_folder(dataset)}.parquet")
        self._record_lineage(ref, path, rows.height, lineage, now)
        self.declare_catalog()
        return WriteResult(ref, path, self._resolved(table, rows), created)

    def _record_lineage(self, ref: DatasetRef, path: Path, rows: int, lineage: Lineage, now: datetime) -> None:
        row = {
            "asset": lineage.asset, "table": ref.table, "dataset": ref.dataset, "iteration": lineage.iteration,
            "data_version": ref.version, "code_version": lineage.code_version, "run_id": lineage.run_id,
            "inputs": [vars(i) for i in lineage.inputs], "row_count": rows, "path": self.relative(path),
            "metadata": json.dumps(lineage.metadata, sort_keys=True, default=str), "created_at": now,
        }
        stamp = now.strftime("%Y%m%dT%H%M%S%fZ")
        atomic_write(pl.DataFrame([row], schema=LINEAGE_SCHEMA),
                      self.home / "lineage" / stamp[:8] / f"{stamp}-{ref.version}-{uuid.uuid4().hex[:6]}.parquet")

    def record_run_failure(self, run_id: str, rows: list[dict]) -> Path:
        """Store a failed run's rows (RUN_FAILURE_SCHEMA); one file per run, so reporting it again replaces it."""
        day = min(r["failed_at"] for r in rows).strftime("%Y%m%d")
        path = self.home / "run_failures" / day / f"{_folder(run_id)}.parquet"
        atomic_write(pl.DataFrame(rows, schema=RUN_FAILURE_SCHEMA), path)
        return path

    # --- reading -------------------------------------------------------------------------------

    def path(self, ref: DatasetRef) -> Path:
        """The Parquet file of a dataset version."""
        return self.home / "datasets" / ref.table / _folder(ref.dataset) / f"{ref.version}.parquet"

    def head(self, table: str, dataset: str) -> DatasetRef | None:
        path = self.home / "heads" / table / f"{_folder(dataset)}.parquet"
        if not path.exists():
            return None
        return DatasetRef(table, dataset, pl.read_parquet(path)["version"][0])

    def datasets(self, table: str) -> list[DatasetRef]:
        """The current version of every dataset of a table."""
        folder = self.home / "heads" / table
        if not folder.exists():
            return []
        heads = pl.concat([pl.read_parquet(p) for p in sorted(folder.glob("*.parquet"))], how="vertical") \
            if any(folder.glob("*.parquet")) else pl.DataFrame(schema=HEAD_SCHEMA)
        return [DatasetRef(table, r["dataset"], r["version"]) for r in heads.sort("dataset").iter_rows(named=True)]

    def read(self, table: str, dataset: str, version: str | None = None) -> pl.DataFrame:
        """A dataset version's rows (the head when no version is given)."""
        if version is None:
            ref = self.head(table, dataset)
            if ref is None:
                raise SandError(f"no dataset '{dataset}' in table '{table}' under {self.home}")
            version = ref.version
        path = self.path(DatasetRef(table, dataset, version))
        if not path.exists():
            raise SandError(f"dataset '{dataset}' has no version {version} in table '{table}' ({path})")
        rows = pl.read_parquet(path)
        # Versions stored before a column was added read it as null rather than failing.
        return self._resolved(table, rows.select([pl.col(c) if c in rows.columns else pl.lit(None, dtype=t).alias(c)
                                                  for c, t in self._schema(table).items()]))

    def _resolved(self, table: str, rows: pl.DataFrame) -> pl.DataFrame:
        return rows.with_columns([pl.col(c).map_elements(lambda p: str(self.resolve(p)), return_dtype=pl.Utf8)
                                  for c in PATH_COLUMNS.get(table, ())])

    def _schema(self, table: str) -> dict[str, pl.DataType]:
        if table not in TABLES:
            raise SandError(f"unknown table '{table}'; tables: {', '.join(TABLES)}")
        return TABLES[table]

    # --- catalog -------------------------------------------------------------------------------

    def _view_sql(self) -> dict[str, str]:
        def glob(*parts: str) -> str:
            return str(self.home.joinpath(*parts)).replace("'", "''")

        heads = f"read_parquet('{glob('heads', '*', '*.parquet')}', union_by_name=true)"
        views = {
            "heads": f"select * from {heads}",
            "lineage": f"select * from read_parquet('{glob('lineage', '*', '*.parquet')}', union_by_name=true)",
            "run_failures": f"select * from read_parquet('{glob('run_failures', '*', '*.parquet')}', "
                            "union_by_name=true) order by failed_at desc",
        }
        for table in TABLES:
            views[f"{table}_all"] = (f"select * from read_parquet('{glob('datasets', table, '*', '*.parquet')}', "
                                     "union_by_name=true)")
            views[f"{table}_current"] = (f"select t.* from {table}_all t join heads h on h.\"table\" = '{table}' "
                                         "and h.dataset = t.dataset and h.version = t.version")
        # The trajectory views people query: one row per trajectory / per step, current versions.
        views["trajectories"] = "select * exclude (steps) from trajectories_current"
        views["steps"] = ("select id as trajectory_id, dataset, version, env, "
                          "generate_subscripts(steps, 1) - 1 as step, unnest(steps, recursive := true) "
                          "from trajectories_current")
        views["evaluations"] = "select * exclude (transcript) from evaluations_current"
        views["evaluation_steps"] = ("select experiment, agent, env, split, task, task_id, dataset, version, "
                                     "generate_subscripts(transcript, 1) - 1 as step, "
                                     "unnest(transcript, recursive := true) from evaluations_current")
        views["evaluation_summary"] = EVALUATION_SUMMARY_SQL
        views["agent_comparison"] = AGENT_COMPARISON_SQL
        views["resolution_summary"] = RESOLUTION_SUMMARY_SQL
        for table in ("checkpoints", "candidates", "rollouts", "critiques", "deliberations"):
            views[table] = f"select * from {table}_current"
        return views

    def connect(self) -> duckdb.DuckDBPyConnection:
        """A reader's connection: an in-memory database holding the catalog's views, able to read files
        under SAND_HOME only (no writes elsewhere, no ATTACH, no extension installs; settings locked)."""
        con = duckdb.connect(":memory:")
        home = str(self.home).replace("'", "''")
        con.execute(f"set allowed_directories = ['{home}/']")
        con.execute("set enable_external_access = false")
        con.execute("set autoinstall_known_extensions = false")
        con.execute("set lock_configuration = true")
        for name, sql in self._view_sql().items():
            con.execute(f"create view {name} as {sql}")
        return con

    def sql(self, query: str, params: list | None = None) -> pl.DataFrame:
        """Run a read-only `query` over the catalog's views; `params` fill its `?` placeholders."""
        try:
            kinds = {s.type for s in duckdb.extract_statements(query)}
        except duckdb.Error as exc:
            raise SandError(f"SQL error: {exc}") from None
        if not kinds <= _READ_STATEMENTS:
            refused = ", ".join(sorted(k.name for k in kinds - _READ_STATEMENTS))
            raise SandError(f"the catalog is read-only: only queries (SELECT, EXPLAIN) run here, not {refused}")
        with self.connect() as con:
            try:
                return con.sql(query, params=params).pl()
            except duckdb.Error as exc:
                raise SandError(f"SQL error: {exc}") from None

    def declare_catalog(self) -> bool:
        """(Re)declare the views of catalog.duckdb for outside tools (the DuckDB CLI, notebooks).

        The file holds nothing but views, so anything else found there (a view dropped or replaced by a
        table, a file that is not a database) is thrown away and the catalog rebuilt. Returns False when
        the file is held open elsewhere: it keeps the views it has, which read the same globs."""
        for attempt in range(2):
            try:
                with duckdb.connect(str(self.catalog_path)) as con:
                    views = self._view_sql()
                    found = dict(con.execute("select table_name, table_type from information_schema.tables "
                                             "where table_schema = 'main'").fetchall())
                    if any(kind != "VIEW" for kind in found.values()) or set(found) - set(views):
                        raise _Damaged()
                    for name, sql in views.items():
                        con.execute(f"create or replace view {name} as {sql}")
                return True
            except duckdb.ConnectionException:  # this process holds it open read-only
                return False
            except duckdb.IOException as exc:
                if "lock" in str(exc).lower():
                    return False
                if attempt:
                    raise
            except (_Damaged, duckdb.Error):
                if attempt:
                    raise
            self._remove_catalog()
        return True

    def _remove_catalog(self) -> None:
        for path in (self.catalog_path, self.catalog_path.with_name(self.catalog_path.name + ".wal")):
            path.unlink(missing_ok=True)


class _Damaged(Exception):
    """catalog.duckdb holds something other than the catalog's views."""
