"""Evaluation: greedy episodes of an agent on the evaluation splits."""
from __future__ import annotations

import polars as pl

from sand.experiment import Experiment
from sand.models.serving import (
    BackendFactory,
    agent_backend,
    agent_identity,
    backend_settings,
)
from sand.preflight import check_experiment
from sand.report import record_uncertainty
from sand.runners.common import (
    Envs,
    EvaluationResult,
    LineageOf,
    Log,
    default_log,
    stage_lineage,
    work_dir,
)
from sand.runners.inputs import checkpoint
from sand.schemas import TRANSCRIPT
from sand.selection import spread_tasks
from sand.store import Store
from sand.worklog import WorkLog


def evaluate_agent(exp: Experiment, store: Store, agent: str, iteration: int | None, backends: BackendFactory,
                   envs: Envs, lineage_of: LineageOf, code: str, log: Log = default_log,
                   control: bool = False) -> EvaluationResult:
    """Greedy episodes of `agent` ("base": the base model; else pi_iteration, or with `control` its compute-matched
    control) on the experiment's evaluation splits; one row per episode in `evaluations` <exp>/<agent>. Finished
    episodes are reused for the same agent weights, backend and evaluation settings."""
    check_experiment(exp)
    from sand.evaluation import evaluate

    checkpoint_ref, path = checkpoint(store, exp, iteration, control) if iteration is not None else (None, None)
    work = work_dir(store, "evaluation", code, agent=agent_identity(exp, path), backend=backend_settings(exp.backend),
                    settings=exp.evaluation.model_dump(), envs=envs.settings)
    rows, planned = [], []
    with agent_backend(exp, store, checkpoint_ref, backends) as (backend, adapter):
        for env_name, cfg in exp.evaluation.envs.items():
            factory = envs.factory(env_name, **({"task_names": cfg.task_names,
                                                 "variations_per_task": cfg.variations_per_task}
                                                if env_name == "sciworld" else {}))
            with factory() as lister:
                tasks = [t for split in cfg.splits for t in spread_tasks(lister.tasks(split), cfg.tasks_per_split)]
            planned += [(t.env, t.split, t.task_id) for t in tasks]
            log(f"{agent}: {len(tasks)} {env_name} episodes on {', '.join(cfg.splits)}")
            records = evaluate(backend, factory, tasks, adapter=adapter, pool_size=exp.evaluation.pool_size,
                               history_steps=exp.evaluation.history_steps, max_steps=cfg.max_steps,
                               max_new_tokens=exp.evaluation.max_new_tokens,
                               max_invalid_streak=cfg.max_invalid_streak, task_max_steps=cfg.task_max_steps,
                               log=WorkLog(work / env_name))
            rows += [{**vars(r), "experiment": exp.name, "agent": agent, "iteration": iteration,
                      "checkpoint": checkpoint_ref.version if checkpoint_ref else None} for r in records]
    written = store.write("evaluations", f"{exp.name}/{agent}", pl.DataFrame(rows, schema_overrides={
        "transcript": TRANSCRIPT}), stage_lineage(lineage_of, "evaluations", iteration,
                                                   [checkpoint_ref] if checkpoint_ref else [], agent=agent,
                                                   backend=backend_settings(exp.backend)))
    # Intervals and paired comparisons with the other agents, stored for the catalog; numeric metadata per split.
    metadata = record_uncertainty(store, exp.name, agent, stage_lineage(
        lineage_of, "evaluation_intervals", iteration, [written.ref], agent=agent))
    metadata["dtype"] = backend_settings(exp.backend)["options"].get("dtype")
    return EvaluationResult({"evaluations": written}, metadata, planned=planned)


def missing_episodes(result: EvaluationResult) -> list[tuple[str, str, str]]:
    """Planned episodes without a row in the evaluation written."""
    stored = set(result.written["evaluations"].rows.select("env", "split", "task_id").iter_rows())
    return [p for p in result.planned if p not in stored]
