"""A folder of Parquet parts that long stages append to as work finishes, so a rerun resumes.

Each append is one file written atomically; a run killed mid-way leaves every finished part.
"""
from __future__ import annotations

from pathlib import Path

import polars as pl

from sand.store import atomic_write


class WorkLog:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def append(self, df: pl.DataFrame) -> None:
        if df.height:
            n = len(list(self.folder.glob("part-*.parquet"))) if self.folder.exists() else 0
            atomic_write(df, self.folder / f"part-{n:06d}.parquet")

    def exists(self) -> bool:
        return self.folder.exists() and any(self.folder.glob("part-*.parquet"))

    def frame(self) -> pl.DataFrame:
        return pl.concat([pl.read_parquet(p) for p in sorted(self.folder.glob("part-*.parquet"))], how="vertical")
