"""D_0: the experiment's share of the expert set."""
from __future__ import annotations

from sand.datasets import EXPERT
from sand.errors import SandError
from sand.experiment import Experiment
from sand.runners.common import (
    LineageOf,
    StageResult,
    iteration_dataset,
    stage_lineage,
)
from sand.selection import training_subset
from sand.store import Store


def select_d0(exp: Experiment, store: Store, lineage_of: LineageOf) -> StageResult:
    """D_0: the experiment's share of the expert set (`train_data`, `train_tasks`), the data SFT and iteration 1
    read."""
    expert = store.head("trajectories", EXPERT)
    if expert is None:
        raise LookupError(f"no expert set in {store.home}: compose one first (sand.datasets.compose_expert)")
    trajectories = store.read("trajectories", EXPERT, expert.version)
    for env, names in exp.train_tasks.items():
        missing = sorted(set(names) - set(trajectories.filter(env=env)["task"]))
        if missing:
            raise SandError(f"experiment {exp.name}: train_tasks.{env} names task types without a trajectory in the "
                            f"expert set {expert.version}: {', '.join(missing)}")
    d0 = training_subset(trajectories, exp.train_data, exp.train_tasks)
    written = store.write("trajectories", iteration_dataset(exp, 0), d0,
                          stage_lineage(lineage_of, "trajectories", 0, [expert]))
    return StageResult({"trajectories": written}, {"trajectories": d0.height})
