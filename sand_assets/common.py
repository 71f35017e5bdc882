"""What the assets share: their lineage record, their metadata (counts, schema, sample, version), check
results, the content keys of their resumable work, and the engine's backends and environments built from
the run's resources."""
from __future__ import annotations

from pathlib import Path

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetKey,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    TableColumn,
    TableSchema,
)

from sand import stages
from sand.experiment import Experiment
from sand.models.serving import BackendFactory, backend_factory
from sand.store import Lineage, Store, WriteResult


def schema_of(df: pl.DataFrame) -> TableSchema:
    return TableSchema(columns=[TableColumn(name, str(dtype)) for name, dtype in df.schema.items()])


def sample_markdown(df: pl.DataFrame, rows: int = 5) -> str:
    flat = df.head(rows).select([c for c, t in df.schema.items() if not isinstance(t, (pl.List, pl.Struct))])
    with pl.Config(tbl_formatting="MARKDOWN", tbl_hide_column_data_types=True, tbl_hide_dataframe_shape=True,
                   fmt_str_lengths=80, tbl_cols=-1):
        return str(flat)


def dataset_result(written: WriteResult, key: AssetKey | None = None, checks: tuple[AssetCheckResult, ...] = (),
                   **extra) -> MaterializeResult:
    """A MaterializeResult of asset `key` (default: the running asset) whose data version is the stored
    dataset's content hash, with the results of its checks."""
    df = written.rows
    counts = {}
    if "env" in df.columns:
        counts = {f"rows/{env}": n for env, n in df.group_by("env").len().sort("env").iter_rows()}
    return MaterializeResult(
        asset_key=key,
        check_results=list(checks),
        data_version=DataVersion(written.ref.version),
        metadata={
            "dagster/row_count": written.row_count,
            "dagster/column_schema": schema_of(df),
            "dataset": written.ref.dataset,
            "version": written.ref.version,
            "path": MetadataValue.path(str(written.path)),
            "sample": MetadataValue.md(sample_markdown(df)),
            **counts,
            **extra,
        },
    )


def check_result(name: str, problems: list[str], key: AssetKey | None = None, warn: bool = False,
                 **metadata) -> AssetCheckResult:
    """An asset check's result: passed when `problems` is empty; a warning (not blocking) when `warn`."""
    return AssetCheckResult(check_name=name, asset_key=key, passed=not problems,
                            severity=AssetCheckSeverity.WARN if warn else AssetCheckSeverity.ERROR,
                            metadata={"problems": MetadataValue.md("\n".join(f"- {p}" for p in problems) or "none"),
                                      **metadata})


def work_dir(context: AssetExecutionContext, store: Store, stage: str, **key) -> Path:
    """The work-log folder (sand.stages.work_dir) of the running asset's work `key`."""
    return stages.work_dir(store, stage, context.assets_def.code_versions_by_key[context.asset_key], **key)


def lineage_for(context: AssetExecutionContext, key: AssetKey | None = None, **fields) -> Lineage:
    """The lineage record of this materialization of asset `key` (default: the running asset): asset key,
    code version, Dagster run id."""
    key = key or context.asset_key
    return Lineage(asset=key.to_user_string(), run_id=context.run.run_id,
                   code_version=context.assets_def.code_versions_by_key[key] or "", **fields)


def lineage_of(context: AssetExecutionContext, keys: dict[str, AssetKey] | None = None) -> stages.LineageOf:
    """The engine's table -> lineage callable: each table written by the asset `keys` names (default: the
    running asset)."""
    return lambda table: lineage_for(context, keys[table] if keys else None)


def backends(exp: Experiment, compute) -> BackendFactory:
    """The experiment's backends, placed as the run's `compute` resource says."""
    compute.apply()
    return backend_factory(exp, device=None if compute.device == "auto" else compute.device)


def environments(sciworld, alfworld) -> stages.Envs:
    """The engine's environments from the run's resources (their settings key the work done in them)."""
    return stages.Envs(lambda env, **options: env_factory(env, sciworld, alfworld, **options),
                       {"sciworld": sciworld.model_dump(), "alfworld": alfworld.model_dump()})


def env_factory(env: str, sciworld, alfworld, **options):
    """A zero-argument constructor of `env` environments (rollout engines make one per pool slot),
    running where the running asset's `compute` resource says: in this process, or in Ray actors."""
    resource = {"sciworld": sciworld, "alfworld": alfworld}.get(env)
    if resource is None:
        raise ValueError(f"unknown environment {env!r}")
    # Read from the run rather than passed in, so every asset that makes environments follows it.
    compute = AssetExecutionContext.get().resources.compute
    if compute.env_workers == "local":
        return lambda: resource.open(**options)
    from sand.distributed.ray_envs import ray_env_factory

    # A resource does not pickle; its class and config do, and rebuild it in the worker.
    cls, config = type(resource), {name: getattr(resource, name) for name in type(resource).model_fields}
    return ray_env_factory(lambda: cls(**config).open(**options), compute.ray_address, compute.ray_env_cpus)
