"""D_0: the experiment's share of the expert set."""
from __future__ import annotations

from sand.datasets import EXPERT
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
    """D_0: the experiment's share of the expert set (`train_data`), the data SFT and iteration 1 read."""
    expert = store.head("trajectories", EXPERT)
    if expert is None:
        raise LookupError(f"no expert set in {store.home}: compose one first (sand.datasets.compose_expert)")
    d0 = training_subset(store.read("trajectories", EXPERT, expert.version), exp.train_data)
    written = store.write("trajectories", iteration_dataset(exp, 0), d0,
                          stage_lineage(lineage_of, "trajectories", 0, [expert]))
    return StageResult({"trajectories": written}, {"trajectories": d0.height})
