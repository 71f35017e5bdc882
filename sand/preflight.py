"""What a run needs from the machine, checked before its first expensive step.

A missing `java`, ALFWorld game folder or base model would otherwise surface minutes or hours into a run,
inside whichever step first needs it; `check_experiment` names every such problem at once.
"""
from __future__ import annotations

import shutil

from sand import config
from sand.errors import SandError
from sand.experiment import Experiment
from sand.models.registry import resolve_model

REAL_ALFWORLD_SPLITS = ("valid_seen", "valid_unseen")  # the others are games generated under SAND_HOME


def problems(exp: Experiment) -> list[str]:
    """Everything `exp` needs that this machine lacks, each as one sentence."""
    found = []
    if "sciworld" in exp.train_data or "sciworld" in exp.evaluation.envs:
        if shutil.which("java") is None:
            found.append("ScienceWorld needs Java 11+ and there is no `java` on PATH")
    alfworld = exp.evaluation.envs.get("alfworld")
    if alfworld is not None and set(alfworld.splits) & set(REAL_ALFWORLD_SPLITS):
        try:
            config.alfworld_data()
        except SandError as exc:
            found.append(f"evaluation.envs.alfworld.splits {alfworld.splits}: {exc}")
    try:
        resolve_model(exp.base_model)
    except SandError as exc:
        found.append(f"base_model: {exc}")
    return found


def check_experiment(exp: Experiment) -> None:
    """Raise a SandError naming every missing requirement of `exp`."""
    found = problems(exp)
    if found:
        raise SandError(f"experiment {exp.name} cannot run here:\n  - " + "\n  - ".join(found))
