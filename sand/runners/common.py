"""What every stage runner shares: its result, how it makes environments, work-log folders and lineage."""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from sand.envs.base import Environment
from sand.experiment import Experiment
from sand.store import DatasetRef, Lineage, Store, WriteResult

Log = Callable[[str], None]
# Where a stage reports progress when its caller gives no `log` (the Dagster assets pass their context's).
default_log: Log = logging.getLogger(__package__).info
LineageOf = Callable[[str], Lineage]

# A synthesis whose writer failed validation on more than this share of its deliberations put mostly
# template thoughts into D_k; the Dagster check on it warns (it does not block).
FALLBACK_WARNING_RATE = 0.5


@dataclass
class Envs:
    """How a stage makes environments: `factory(env, **options)` gives a zero-argument constructor (rollout
    engines make one per pool slot); `settings` are what the environments' behaviour depends on (work keys)."""

    factory: Callable[..., Callable[[], Environment]]
    settings: dict = field(default_factory=dict)


@dataclass
class StageResult:
    written: dict[str, WriteResult]  # table -> the dataset version written
    counts: dict[str, int | float | str | None] = field(default_factory=dict)  # what the stage reports


@dataclass
class EvaluationResult(StageResult):
    planned: list[tuple[str, str, str]] = field(default_factory=list)  # (env, split, task_id) of every episode


def iteration_dataset(exp: Experiment, k: int) -> str:
    """D_k's dataset in `trajectories` (D_0: the experiment's share of the expert set)."""
    return f"{exp.name}/d0" if k == 0 else f"{exp.name}/iter_{k}"


def work_dir(store: Store, stage: str, code: str, **key) -> Path:
    """The work-log folder of `stage` for the work `key` names: every input version and setting the work
    depends on, and `code`, never the experiment's name. Experiments that do the same work (an ablation
    branching off the same SFT checkpoint, a rerun) therefore find it done; changed code computes afresh."""
    key["code"] = code
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return store.home / "work" / stage / digest


def stage_lineage(lineage_of: LineageOf, table: str, iteration: int | None, inputs: list[DatasetRef],
                  **metadata) -> Lineage:
    """The lineage record of a table a stage writes: who writes it (`lineage_of`), from which inputs."""
    return replace(lineage_of(table), iteration=iteration, inputs=inputs, metadata=metadata)
