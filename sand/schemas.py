"""Row schemas of the stored tables (the store adds `dataset` and `version` columns to each)."""
from __future__ import annotations

import polars as pl

from sand.trajectory import TRAJECTORY_SCHEMA

DATASET_REF = pl.Struct({"table": pl.Utf8, "dataset": pl.Utf8, "version": pl.Utf8})

CHECKPOINT_SCHEMA: dict[str, pl.DataType] = {
    "experiment": pl.Utf8,
    "asset": pl.Utf8,
    "iteration": pl.Int32,
    "path": pl.Utf8,  # adapter or model folder written by the trainer
    "lora": pl.Boolean,
    "base_model": pl.Utf8,
    "base_model_hash": pl.Utf8,
    "init_checkpoint": pl.Utf8,  # the checkpoint training continued from (null: the base model)
    "train_data": pl.List(DATASET_REF),
    "examples": pl.Int64,
    "train_steps": pl.Int64,
    "final_loss": pl.Float64,
    "seconds": pl.Float64,
    "tokens_per_second": pl.Float64,
    "loss_curve": pl.List(pl.Struct({"step": pl.Int64, "loss": pl.Float64})),
}

EVALUATION_SCHEMA: dict[str, pl.DataType] = {
    "experiment": pl.Utf8,
    "agent": pl.Utf8,  # "base", "sft", "iter_1", ...
    "iteration": pl.Int32,
    "checkpoint": pl.Utf8,  # checkpoint version evaluated (null: the prompted base model)
    "env": pl.Utf8,
    "split": pl.Utf8,
    "task": pl.Utf8,
    "task_id": pl.Utf8,
    "reward": pl.Float64,
    "success": pl.Boolean,
    "steps": pl.Int32,
    "format_errors": pl.Int32,
    "invalid_actions": pl.Int32,
    "deliberation_steps": pl.Int32,
    "prompt_tokens": pl.Int64,
    "completion_tokens": pl.Int64,
}

# The SAND loop (sand.sand_loop.tables converts its dataclasses to and from these).
_KEY = {"task_id": pl.Utf8, "prefix_len": pl.Int32, "prefix_digest": pl.Utf8, "action": pl.Utf8,
        "trajectory_id": pl.Utf8, "step": pl.Int32}
_TEXTS = pl.List(pl.Utf8)

CANDIDATES_SCHEMA: dict[str, pl.DataType] = {
    "trajectory_id": pl.Utf8, "step": pl.Int32, "expert_action": pl.Utf8, "candidates": _TEXTS,
    "n_samples": pl.Int32, "format_errors": pl.Int32, "uncertain": pl.Boolean, "samples": _TEXTS,
}
ROLLOUTS_SCHEMA: dict[str, pl.DataType] = {
    **_KEY, "executed": pl.Utf8, "thoughts": _TEXTS, "actions": _TEXTS, "observations": _TEXTS,
    "reward": pl.Float64, "steps": pl.Int32, "done": pl.Boolean, "agent": pl.Utf8,
}
CRITIQUES_SCHEMA: dict[str, pl.DataType] = {
    **_KEY, "verdict": pl.Utf8, "verdict_inferred": pl.Boolean, "text": pl.Utf8, "critic": pl.Utf8,
}
DELIBERATIONS_SCHEMA: dict[str, pl.DataType] = {
    "trajectory_id": pl.Utf8, "step": pl.Int32, "thought": pl.Utf8, "answer": pl.Utf8, "candidates": _TEXTS,
    "fallback": pl.Boolean, "retried": pl.Boolean, "mode": pl.Utf8,
}


TABLES: dict[str, dict[str, pl.DataType]] = {
    # What each source produced (one dataset per environment or imported file).
    "source_trajectories": TRAJECTORY_SCHEMA,
    # Curated sets the loop trains on: `expert` (D_0), experiment subsets, deliberation datasets.
    "trajectories": TRAJECTORY_SCHEMA,
    "checkpoints": CHECKPOINT_SCHEMA,
    "evaluations": EVALUATION_SCHEMA,
    "candidates": CANDIDATES_SCHEMA,
    "rollouts": ROLLOUTS_SCHEMA,
    "critiques": CRITIQUES_SCHEMA,
    "deliberations": DELIBERATIONS_SCHEMA,
}

# Per-split metrics as the paper defines them, over the current evaluation datasets.
EVALUATION_SUMMARY_SQL = """
select experiment, agent, iteration, checkpoint, env, split, count(*) as episodes,
       round(100 * avg(reward), 1) as avg_reward,
       round(100 * avg(success::int), 1) as success_rate,
       round(avg(reward / greatest(steps, 1)), 4) as per_step_reward,
       round(sum(deliberation_steps) / greatest(sum(steps), 1), 3) as deliberation_rate,
       round(avg(prompt_tokens + completion_tokens)) as tokens_per_task,
       round(sum(format_errors) / greatest(sum(steps), 1), 3) as format_error_rate,
       round(sum(invalid_actions) / greatest(sum(steps), 1), 3) as invalid_action_rate
from evaluations
group by all
order by experiment, env, split, iteration nulls first, agent
"""
