"""What the dataset assets share: their lineage record and their metadata (counts, schema, sample, version),
and the content keys of their resumable work."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import polars as pl
from dagster import AssetExecutionContext, DataVersion, MaterializeResult, MetadataValue, TableColumn, TableSchema

from sand.store import Lineage, Store, WriteResult


def schema_of(df: pl.DataFrame) -> TableSchema:
    return TableSchema(columns=[TableColumn(name, str(dtype)) for name, dtype in df.schema.items()])


def sample_markdown(df: pl.DataFrame, rows: int = 5) -> str:
    flat = df.head(rows).select([c for c, t in df.schema.items() if not isinstance(t, (pl.List, pl.Struct))])
    with pl.Config(tbl_formatting="MARKDOWN", tbl_hide_column_data_types=True, tbl_hide_dataframe_shape=True,
                   fmt_str_lengths=80, tbl_cols=-1):
        return str(flat)


def dataset_result(written: WriteResult, **extra) -> MaterializeResult:
    """A MaterializeResult whose data version is the stored dataset's content hash."""
    df = written.rows
    counts = {}
    if "env" in df.columns:
        counts = {f"rows/{env}": n for env, n in df.group_by("env").len().sort("env").iter_rows()}
    return MaterializeResult(
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


def work_dir(context: AssetExecutionContext, store: Store, stage: str, **key) -> Path:
    """The work-log folder of `stage` for the work `key` names: every input version and setting the work
    depends on, and the asset's code version, never the experiment's name. Experiments that do the same work
    (an ablation branching off the same SFT checkpoint, a rerun) therefore find it done and do not compute it
    again; changed code computes afresh."""
    key["code"] = context.assets_def.code_versions_by_key[context.asset_key]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return store.home / "work" / stage / digest


def lineage_for(context: AssetExecutionContext, **fields) -> Lineage:
    """The lineage record of this materialization: asset key, code version, Dagster run id."""
    return Lineage(asset=context.asset_key.to_user_string(), run_id=context.run.run_id,
                   code_version=context.assets_def.code_versions_by_key[context.asset_key] or "", **fields)


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
