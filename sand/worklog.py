"""A folder of Parquet parts that long stages append to as work finishes, so a rerun resumes.

Each append is one part, committed by a single rename: a run killed mid-way leaves every finished
part and no half of one. Part names are unique (a time stamp and a random suffix), never counted, so
several processes may append to one log at once. A stage that writes several tables per unit of
work commits them together (`append_together`): one part folder holding a file per table, built
under a temporary name and renamed into place, so a resumed stage finds either all of a unit's rows
or none of them, and skips the keys it finds.

Layout: `part-<ns>-<hex>.parquet` (single-table `append`) and `part-<ns>-<hex>/<table>.parquet`
(`append_together`). Names starting with "." are unfinished and never read.
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

import polars as pl

from sand.store import atomic_write


def _part_name() -> str:
    return f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"


class WorkLog:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def append(self, df: pl.DataFrame) -> None:
        """Commit one table's rows as a part of their own."""
        if df.height:
            atomic_write(df, self.folder / f"{_part_name()}.parquet")

    def append_together(self, **frames: pl.DataFrame) -> None:
        """Commit rows of several tables (name=rows) as one part: a reader sees all of them or none."""
        frames = {name: df for name, df in frames.items() if df.height}
        if not frames:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        name = _part_name()
        tmp = self.folder / f".{name}.tmp"
        tmp.mkdir()
        try:
            for table, df in frames.items():
                df.write_parquet(tmp / f"{table}.parquet")
            os.rename(tmp, self.folder / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _files(self, name: str | None) -> list[Path]:
        if not self.folder.exists():
            return []
        pattern = "part-*.parquet" if name is None else f"part-*/{name}.parquet"
        return sorted(self.folder.glob(pattern))

    def exists(self, name: str | None = None) -> bool:
        """Whether any part holds rows (of table `name`, for logs written with `append_together`)."""
        return bool(self._files(name))

    def frame(self, name: str | None = None) -> pl.DataFrame:
        """Every committed row, in commit order: of the single-table parts, or of table `name`."""
        return pl.concat([pl.read_parquet(p) for p in self._files(name)], how="vertical")
