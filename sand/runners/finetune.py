"""Finetuning: pi_k trained on D_k (pi_0: SFT on D_0)."""
from __future__ import annotations

from collections.abc import Callable

import polars as pl

from sand.experiment import Experiment
from sand.models.checkpoints import TrainPlan, checkpoint_dataset, checkpoint_row, plan_training
from sand.preflight import check_experiment
from sand.runners.common import (
    LineageOf,
    Log,
    StageResult,
    default_log,
    iteration_dataset,
    stage_lineage,
)
from sand.runners.inputs import checkpoint
from sand.store import Store


def train_here(plan: TrainPlan) -> dict:
    """Train in this process (the Dagster asset launches the same training in a child process instead)."""
    from sand.training.sft import train

    return train(plan.spec)


def finetune(exp: Experiment, store: Store, k: int, lineage_of: LineageOf,
             train: Callable[[TrainPlan], dict] = train_here, log: Log = default_log,
             control: bool = False) -> StageResult:
    """pi_k: the base model trained on D_0 (k = 0), or pi_{k-1} on D_k (continued, not restarted). With
    `control`, pi_k's compute-matched control: pi_{k-1} trained on D_{k-1} unchanged, for as many optimizer steps
    as pi_k was, with the same settings, so that pi_k against it measures the deliberation data and not the extra
    training. A plan already trained (same base, data, start, settings and training code) is found, not trained
    again."""
    check_experiment(exp)
    name = iteration_dataset(exp, k - 1 if control else k)
    data = store.head("trajectories", name)
    if data is None:
        raise LookupError(f"{exp.name}: no {name} in {store.home} to train on")
    init = checkpoint(store, exp, k - 1)[1] if k > 0 else None
    inputs, steps = [data], None
    if control:
        matched, _ = checkpoint(store, exp, k)
        steps = int(store.read("checkpoints", matched.dataset, matched.version)["train_steps"][0])
        inputs.append(matched)
    plan = plan_training(exp, store, k, data, init, max_steps=steps)
    log(f"training {plan.output} on {data.dataset}@{data.version}"
        + (f" for {steps} steps, as many as pi_{k}" if control else ""))
    metrics = train(plan)
    lineage = stage_lineage(lineage_of, "checkpoints", k, inputs, checkpoint=str(plan.output),
                            base_model_hash=plan.base_model_hash, bf16=plan.spec.bf16)
    row = checkpoint_row(exp, plan, lineage.asset, k, metrics)
    written = store.write("checkpoints", checkpoint_dataset(exp, k, control), pl.DataFrame([row]), lineage)
    return StageResult({"checkpoints": written}, {
        "examples": metrics["examples"], "train_steps": metrics["steps"], "final_loss": metrics["final_loss"],
        "seconds": metrics["seconds"], "tokens_per_second": metrics["tokens_per_second"],
        "resumed": metrics.get("resumed", False), "dtype": "bfloat16" if plan.spec.bf16 else "float32"})
