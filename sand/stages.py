"""The stages of a SAND experiment as plain functions over the store, one per step that writes tables:

    select_d0       D_0, the experiment's share of the expert set             trajectories  <exp>/d0
    sample          pi_{k-1} samples candidate actions at every step of D_{k-1}  candidates    <exp>/iter_k
    critique        every candidate of an uncertain step rolled out and judged  rollouts, critiques
    synthesize      deliberation thoughts at uncertain steps, and D_k           deliberations, trajectories
    finetune        pi_k: pi_{k-1} trained on D_k                               checkpoints   <exp>/sft, /iter_k
                    (control: pi_{k-1} on D_{k-1}, as many steps as pi_k)                     <exp>/control_k
    evaluate_agent  greedy episodes of an agent on the evaluation splits        evaluations   <exp>/<agent>

Each stage first checks that the machine has what the experiment needs (sand.preflight), so a run started
anywhere (CLI, UI, sensor, notebook) fails at its first stage, not hours in. It reads its inputs from the
store, resumes from its work log where it has one (keyed by every input version and setting the work
depends on and by `code`, the version of the code doing it), persists as it goes, writes its tables with
lineage started by `lineage_of(table)` (who writes: asset or script name, code version, run id), and
returns what it wrote. The Dagster assets call one stage each; `run_iteration` calls a whole iteration's
stages in order.

Each runner lives in a module of its own under sand.runners, so a stage's code version (`stage_code`) covers
the code that stage runs and nothing else: a change to the evaluation leaves training and sampling current.
"""
from __future__ import annotations

from collections.abc import Callable

from sand.models.checkpoints import TrainPlan
from sand.models.serving import BackendFactory
from sand.runners.common import (
    FALLBACK_WARNING_RATE,
    Envs,
    EvaluationResult,
    LineageOf,
    Log,
    StageResult,
    default_log,
    iteration_dataset,
    work_dir,
)
from sand.runners.critique import critique
from sand.runners.d0 import select_d0
from sand.runners.evaluation import evaluate_agent, missing_episodes
from sand.runners.finetune import finetune, train_here
from sand.runners.sampling import sample
from sand.runners.synthesis import synthesize
from sand.store import Store
from sand.versioning import code_version

__all__ = ["FALLBACK_WARNING_RATE", "Envs", "EvaluationResult", "LineageOf", "StageResult", "critique",
           "evaluate_agent", "finetune", "iteration_dataset", "missing_episodes", "run_iteration", "sample",
           "select_d0", "stage_code", "synthesize", "train_here", "work_dir"]

# Each stage's runner module: its import closure is the stage's code version.
STAGES = {stage: f"sand.runners.{stage}" for stage in ("d0", "sampling", "critique", "synthesis", "finetune",
                                                         "evaluation")}


def stage_code(stage: str) -> str:
    """The code version of a stage (a key of STAGES): everything its runner module runs, prompts included."""
    return code_version(STAGES[stage], prompts=stage != "d0")


def run_iteration(exp, store: Store, k: int, backends: BackendFactory, envs: Envs, lineage_of: LineageOf,
                  train: Callable[[TrainPlan], dict] = train_here, log: Log = default_log) -> dict[str, StageResult]:
    """SAND iteration k from the store: D_{k-1} and pi_{k-1} -> candidates, rollouts and critiques, D_k,
    pi_k and its evaluation, and (`sand.control`) pi_k's compute-matched control and its evaluation (each stage's
    result by name)."""
    results = {"sample": sample(exp, store, k, backends, lineage_of, stage_code("sampling"), log)}
    results["critique"] = critique(exp, store, k, backends, envs, lineage_of, stage_code("critique"), log)
    results["synthesize"] = synthesize(exp, store, k, backends, lineage_of, stage_code("synthesis"), log)
    results["finetune"] = finetune(exp, store, k, lineage_of, train, log)
    results["evaluate"] = evaluate_agent(exp, store, f"iter_{k}", k, backends, envs, lineage_of,
                                         stage_code("evaluation"), log)
    if exp.sand.control:
        results["control"] = finetune(exp, store, k, lineage_of, train, log, control=True)
        results["evaluate_control"] = evaluate_agent(exp, store, f"control_{k}", k, backends, envs, lineage_of,
                                                     stage_code("evaluation"), log, control=True)
    return results
