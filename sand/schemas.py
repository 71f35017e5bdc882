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

# One agent step of an evaluated episode: its raw reply, the thought and action parsed from it (action "": a reply
# without one), what the environment answered, whether it accepted the action, and its score after the step.
TRANSCRIPT = pl.List(pl.Struct({"reply": pl.Utf8, "thought": pl.Utf8, "action": pl.Utf8, "observation": pl.Utf8,
                                "valid": pl.Boolean, "score": pl.Float64}))

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
    "max_invalid_streak": pl.Int32,  # the setting: this many consecutive invalid actions end an episode (null: off)
    "invalid_cutoff": pl.Boolean,  # the episode ended by that rule
    "deliberation_steps": pl.Int32,
    "prompt_tokens": pl.Int64,
    "completion_tokens": pl.Int64,
    "transcript": TRANSCRIPT,  # the episode as the agent played it (the `evaluation_steps` view: a row a step)
}

# Uncertainty of the scores (sand.report.record_uncertainty, after each evaluation): bootstrap intervals of an
# agent's mean reward per env/split, and paired comparisons with every other agent of its experiment. Each
# row names the `evaluations` versions it was computed from; the views show only rows of current versions.
_BOOTSTRAP = {"level": pl.Float64, "n_boot": pl.Int32, "seed": pl.Int64}
INTERVAL_SCHEMA: dict[str, pl.DataType] = {
    "experiment": pl.Utf8, "agent": pl.Utf8, "evaluation": pl.Utf8, "env": pl.Utf8, "split": pl.Utf8,
    "episodes": pl.Int64, "mean": pl.Float64, "ci_lo": pl.Float64, "ci_hi": pl.Float64, **_BOOTSTRAP,
}
COMPARISON_SCHEMA: dict[str, pl.DataType] = {
    "experiment": pl.Utf8, "agent": pl.Utf8, "evaluation": pl.Utf8, "baseline": pl.Utf8,
    "baseline_evaluation": pl.Utf8, "env": pl.Utf8, "split": pl.Utf8, "n": pl.Int64, "mean_diff": pl.Float64,
    "lo": pl.Float64, "hi": pl.Float64, "won": pl.Int64, "lost": pl.Int64, "tied": pl.Int64, **_BOOTSTRAP,
}

# The SAND loop (sand.sand_loop.tables converts its dataclasses to and from these).
_KEY = {"task_id": pl.Utf8, "prefix_len": pl.Int32, "prefix_digest": pl.Utf8, "action": pl.Utf8,
        "trajectory_id": pl.Utf8, "step": pl.Int32}
_TEXTS = pl.List(pl.Utf8)

CANDIDATES_SCHEMA: dict[str, pl.DataType] = {
    "trajectory_id": pl.Utf8, "step": pl.Int32, "expert_action": pl.Utf8, "candidates": _TEXTS,
    "n_samples": pl.Int32, "format_errors": pl.Int32, "uncertain": pl.Boolean, "samples": _TEXTS,
}
# Execution evidence of a candidate (sand.sand_loop.critique): accepted by the environment, the score before it,
# right after it and at the end of its rollout, won, and the evidence verdict its rule derives from these.
_SCORES = {"score_before": pl.Float64, "score_after": pl.Float64}
ROLLOUTS_SCHEMA: dict[str, pl.DataType] = {
    **_KEY, "executed": pl.Utf8, "thoughts": _TEXTS, "actions": _TEXTS, "observations": _TEXTS,
    "reward": pl.Float64, "steps": pl.Int32, "done": pl.Boolean, "agent": pl.Utf8,
    "valid": pl.Boolean, **_SCORES, "won": pl.Boolean, "evidence": pl.Utf8,
}
CRITIQUES_SCHEMA: dict[str, pl.DataType] = {
    **_KEY, "verdict": pl.Utf8, "verdict_inferred": pl.Boolean, "text": pl.Utf8, "critic": pl.Utf8,
    "insight_written": pl.Boolean, "valid": pl.Boolean, "observation": pl.Utf8, **_SCORES, "score_end": pl.Float64,
    "won": pl.Boolean, "steps": pl.Int32, "evidence": pl.Utf8,
    "agrees": pl.Boolean,  # the critic's verdict is the evidence verdict
}
DELIBERATIONS_SCHEMA: dict[str, pl.DataType] = {
    "trajectory_id": pl.Utf8, "step": pl.Int32, "thought": pl.Utf8, "answer": pl.Utf8, "candidates": _TEXTS,
    "fallback": pl.Boolean, "retried": pl.Boolean, "mode": pl.Utf8,
    "rejection": pl.Utf8,  # why the writer's last thought was rejected (null: accepted)
    "repeated": pl.Boolean,  # a thought the writer wrote repeated a sentence
    "named": pl.Int32,  # distinct candidates the stored thought names in double quotes
    "valid": pl.Boolean,  # the stored thought passes the validator (fallbacks included)
}


TABLES: dict[str, dict[str, pl.DataType]] = {
    # What each source produced (one dataset per environment or imported file).
    "source_trajectories": TRAJECTORY_SCHEMA,
    # Curated sets the loop trains on: `expert` (D_0), experiment subsets, deliberation datasets.
    "trajectories": TRAJECTORY_SCHEMA,
    "checkpoints": CHECKPOINT_SCHEMA,
    "evaluations": EVALUATION_SCHEMA,
    "evaluation_intervals": INTERVAL_SCHEMA,
    "agent_comparisons": COMPARISON_SCHEMA,
    "candidates": CANDIDATES_SCHEMA,
    "rollouts": ROLLOUTS_SCHEMA,
    "critiques": CRITIQUES_SCHEMA,
    "deliberations": DELIBERATIONS_SCHEMA,
}

# Imported data matched to environment tasks and verified by replay (sand.formats.resolve), per current
# source dataset and environment.
RESOLUTION_SUMMARY_SQL = """
select dataset, env, count(*) as trajectories,
       count(*) filter (where resolution not in ('unmatched', 'pending')) as matched,
       count(*) filter (where replay = 'faithful') as replayed,
       count(*) filter (where replay = 'diverged') as diverged,
       count(*) filter (where resolution = 'unmatched') as unmatched,
       count(*) filter (where resolution = 'pending') as pending
from source_trajectories_current
where resolution is not null
group by all
order by dataset, env
"""

# Per-split metrics as the paper defines them, over the current evaluation datasets, with the 95% bootstrap
# interval of avg_reward (null where no interval was recorded for that version of the episodes).
EVALUATION_SUMMARY_SQL = """
with s as (
  select experiment, agent, iteration, checkpoint, env, split, version, count(*) as episodes,
         round(100 * avg(reward), 1) as avg_reward,
         round(100 * avg(success::int), 1) as success_rate,
         round(avg(reward / greatest(steps, 1)), 4) as per_step_reward,
         round(sum(deliberation_steps) / greatest(sum(steps), 1), 3) as deliberation_rate,
         round(avg(prompt_tokens + completion_tokens)) as tokens_per_task,
         round(sum(format_errors) / greatest(sum(steps), 1), 3) as format_error_rate,
         round(sum(invalid_actions) / greatest(sum(steps), 1), 3) as invalid_action_rate
  from evaluations
  group by all
)
select s.* exclude (version), round(100 * i.ci_lo, 1) as ci_lo, round(100 * i.ci_hi, 1) as ci_hi
from s left join evaluation_intervals_current i
  on i.experiment = s.experiment and i.agent = s.agent and i.env = s.env and i.split = s.split
  and i.evaluation = s.version
order by s.experiment, s.env, s.split, s.iteration nulls first, s.agent
"""

# Each agent against each other agent of its experiment on the tasks both were evaluated on (x100): the
# mean difference agent - baseline with its 95% bootstrap interval, tasks won / lost / tied. Only pairs whose
# two evaluations are both current (either agent's evaluation asset records the pair).
AGENT_COMPARISON_SQL = """
with cur as (select distinct experiment, agent, version from evaluations)
select distinct c.experiment, c.agent, c.baseline, c.env, c.split, c.n, round(100 * c.mean_diff, 1) as mean_diff,
       round(100 * c.lo, 1) as lo, round(100 * c.hi, 1) as hi, c.won, c.lost, c.tied
from agent_comparisons_all c
join cur a on a.experiment = c.experiment and a.agent = c.agent and a.version = c.evaluation
join cur b on b.experiment = c.experiment and b.agent = c.baseline and b.version = c.baseline_evaluation
order by c.experiment, c.baseline, c.agent, c.env, c.split
"""
