"""ReAct trajectories: the unit every dataset of the platform is made of.

A trajectory is an instruction (the task as the agent is told it) followed by steps; each step is
the assistant turn (thought + action) and the environment's answer (observation). Tables hold one
row per trajectory with the steps nested, so a dataset version is one Parquet file; the catalog's
`steps` view unnests them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import polars as pl

STEP_DTYPE = pl.Struct({"thought": pl.Utf8, "action": pl.Utf8, "observation": pl.Utf8})

# Column order of the stored `trajectories` table (before the store adds dataset/version columns).
TRAJECTORY_SCHEMA: dict[str, pl.DataType] = {
    "id": pl.Utf8,
    "env": pl.Utf8,
    "task": pl.Utf8,
    "task_id": pl.Utf8,
    "split": pl.Utf8,
    "source": pl.Utf8,
    "instruction": pl.Utf8,
    "n_steps": pl.Int32,
    "reward": pl.Float64,
    "steps": pl.List(STEP_DTYPE),
    # Imported data (sand.formats.resolve): how the task was matched ("unmatched", "pending"; null for
    # trajectories recorded here), the replay's verdict ("faithful" / "diverged") and the first step whose
    # observation differed.
    "resolution": pl.Utf8,
    "replay": pl.Utf8,
    "diverged_at": pl.Int32,
}

ENVS = ("sciworld", "alfworld")


@dataclass
class Step:
    thought: str
    action: str
    observation: str


@dataclass
class Trajectory:
    id: str
    env: str
    task: str
    task_id: str
    split: str
    source: str  # where the steps came from: "gold", "planner", "observer", "eto", ...
    instruction: str
    steps: list[Step] = field(default_factory=list)
    reward: float | None = None  # final score in [0, 1]; None when unknown (some imports)
    resolution: str | None = None  # how an imported trajectory's task was matched (see TRAJECTORY_SCHEMA)
    replay: str | None = None
    diverged_at: int | None = None

    def to_row(self) -> dict:
        row = asdict(self)
        row["n_steps"] = len(self.steps)
        return {k: row[k] for k in TRAJECTORY_SCHEMA}

    @classmethod
    def from_row(cls, row: dict) -> Trajectory:
        return cls(
            id=row["id"], env=row["env"], task=row["task"], task_id=row["task_id"], split=row["split"],
            source=row["source"], instruction=row["instruction"], reward=row["reward"],
            steps=[Step(**s) for s in row["steps"]], resolution=row["resolution"], replay=row["replay"],
            diverged_at=row["diverged_at"],
        )


def to_frame(trajectories: list[Trajectory]) -> pl.DataFrame:
    return pl.DataFrame([t.to_row() for t in trajectories], schema=TRAJECTORY_SCHEMA, orient="row")


# Columns added after trajectories were first stored: frames written before them (work logs) read them as null.
_LATER = ("resolution", "replay", "diverged_at")


def from_frame(df: pl.DataFrame) -> list[Trajectory]:
    df = df.with_columns(pl.lit(None, TRAJECTORY_SCHEMA[c]).alias(c) for c in _LATER if c not in df.columns)
    return [Trajectory.from_row(r) for r in df.select(list(TRAJECTORY_SCHEMA)).iter_rows(named=True)]

