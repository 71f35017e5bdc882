"""The stages of a SAND experiment as plain functions over the store, one per step that writes tables:

    select_d0       D_0, the experiment's share of the expert set             trajectories  <exp>/d0
    sample          pi_{k-1} samples candidate actions at every step of D_{k-1}  candidates    <exp>/iter_k
    critique        every candidate of an uncertain step rolled out and judged  rollouts, critiques
    synthesize      deliberation thoughts at uncertain steps, and D_k           deliberations, trajectories
    finetune        pi_k: pi_{k-1} trained on D_k                               checkpoints   <exp>/sft, /iter_k
    evaluate_agent  greedy episodes of an agent on the evaluation splits        evaluations   <exp>/<agent>

Each stage first checks that the machine has what the experiment needs (sand.preflight), so a run started
anywhere (CLI, UI, sensor, notebook) fails at its first stage, not hours in. It reads its inputs from the
store, resumes from its work log where it has one (keyed by every input version and setting the work
depends on and by `code`, the version of the code doing it), persists
as it goes, writes its tables with lineage started by `lineage_of(table)` (who writes: asset or script name,
code version, run id), and returns what it wrote. The Dagster assets call one stage each; `run_iteration`
calls a whole iteration's stages in order.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import polars as pl

from sand.datasets import EXPERT
from sand.envs.base import Environment
from sand.experiment import Experiment
from sand.models.backends import SamplingParams
from sand.models.checkpoints import TrainPlan, checkpoint_dataset, checkpoint_row, plan_training
from sand.models.serving import (
    BackendFactory,
    agent_backend,
    agent_identity,
    critic_backend,
    critic_identity,
    critic_model,
)
from sand.preflight import check_experiment
from sand.report import record_uncertainty
from sand.rollout import RolloutEngine
from sand.sand_loop.critique import critique_candidates
from sand.sand_loop.quality import critique_quality, deliberation_quality
from sand.sand_loop.sampling import STOP, sample_candidates
from sand.sand_loop.synthesis import synthesize as synthesize_deliberations
from sand.sand_loop.tables import (
    candidates_frame,
    candidates_from_frame,
    critiques_frame,
    critiques_from_frame,
    deliberations_frame,
    rollouts_frame,
    rollouts_from_frame,
)
from sand.selection import replayable, spread_tasks, training_subset
from sand.store import DatasetRef, Lineage, Store, WriteResult
from sand.trajectory import Trajectory, from_frame, to_frame
from sand.versioning import code_version
from sand.worklog import WorkLog

_logger = logging.getLogger(__name__)
Log = Callable[[str], None]
LineageOf = Callable[[str], Lineage]

# A synthesis whose writer failed validation on more than this share of its deliberations put mostly
# template thoughts into D_k; the Dagster check on it warns (it does not block).
FALLBACK_WARNING_RATE = 0.5

# The modules (and prompt templates) each stage's results depend on: asset code versions and work keys.
_STAGE_CODE = {
    "d0": (("sand.selection",), False),
    "loop": (("sand.sand_loop.sampling", "sand.sand_loop.critique", "sand.sand_loop.synthesis",
              "sand.sand_loop.actions", "sand.rollout", "sand.react"), True),
    "finetune": (("sand.training.sft", "sand.react"), True),
    "evaluation": (("sand.evaluation", "sand.rollout", "sand.react", "sand.selection"), True),
}


def stage_code(stage: str) -> str:
    """The code version of a stage: "d0", "loop" (sampling, critique, synthesis), "finetune", "evaluation".
    The runners live in this module, so its import closure is part of every stage's version."""
    modules, prompts = _STAGE_CODE[stage]
    return code_version(__name__, *modules, prompts=prompts)


@dataclass
class Envs:
    """How a stage makes environments: `factory(env, **options)` gives a zero-argument constructor (rollout
    engines make one per pool slot); `settings` are what the environments' behaviour depends on (work keys)."""

    factory: Callable[..., Callable[[], Environment]]
    settings: dict = field(default_factory=dict)


@dataclass
class StageResult:
    written: dict[str, WriteResult]  # table -> the dataset version written
    counts: dict[str, int | float] = field(default_factory=dict)  # what the stage reports


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


def _lineage(lineage_of: LineageOf, table: str, iteration: int | None, inputs: list[DatasetRef],
             **metadata) -> Lineage:
    return replace(lineage_of(table), iteration=iteration, inputs=inputs, metadata=metadata)


def checkpoint(store: Store, exp: Experiment, k: int) -> tuple[DatasetRef, str]:
    """pi_k: its checkpoint record and folder."""
    ref = store.head("checkpoints", checkpoint_dataset(exp, k))
    if ref is None:
        raise LookupError(f"{exp.name}: no checkpoint of iteration {k} in {store.home} (train it first)")
    return ref, str(store.resolve(store.read("checkpoints", ref.dataset, ref.version)["path"][0]))


def previous_data(store: Store, exp: Experiment, k: int,
                  log: Log = _logger.info) -> tuple[DatasetRef, list[Trajectory], list[Trajectory]]:
    """(ref of D_{k-1}, all its trajectories, those iteration k deliberates over).

    Iteration 1 deliberates over the share of D_0 `sand.trajectories` names (all of it by default), later
    iterations over what the previous one deliberated; trajectories the environments here cannot replay
    (imported data) are never deliberated. D_k carries every other trajectory of D_{k-1} unchanged, so the
    agent keeps training on all of its data."""
    ref = store.head("trajectories", iteration_dataset(exp, k - 1))
    if ref is None:
        raise LookupError(f"{exp.name}: no D_{k - 1} ({iteration_dataset(exp, k - 1)}) in {store.home}")
    frame = store.read("trajectories", ref.dataset, ref.version)
    trajectories = from_frame(frame)
    if k > 1:
        return ref, trajectories, [t for t in trajectories if t.source == "sand"]
    share = {r["id"] for r in training_subset(frame, exp.sand.trajectories).iter_rows(named=True)} \
        if exp.sand.trajectories is not None else {t.id for t in trajectories}
    chosen = [t for t in trajectories if t.id in share and replayable(t)]
    unplayable = sum(t.id in share and not replayable(t) for t in trajectories)
    if unplayable:
        log(f"warning: {unplayable} trajectories of {ref.dataset} cannot be replayed in the environments here "
            "(imported data): D_1 carries them unchanged")
    return ref, trajectories, chosen


def select_d0(exp: Experiment, store: Store, lineage_of: LineageOf) -> StageResult:
    """D_0: the experiment's share of the expert set (`train_data`), the data SFT and iteration 1 read."""
    expert = store.head("trajectories", EXPERT)
    if expert is None:
        raise LookupError(f"no expert set in {store.home}: compose one first (sand.datasets.compose_expert)")
    d0 = training_subset(store.read("trajectories", EXPERT, expert.version), exp.train_data)
    written = store.write("trajectories", iteration_dataset(exp, 0), d0,
                          _lineage(lineage_of, "trajectories", 0, [expert]))
    return StageResult({"trajectories": written}, {"trajectories": d0.height})


def sample(exp: Experiment, store: Store, k: int, backends: BackendFactory, lineage_of: LineageOf,
           code: str, log: Log = _logger.info) -> StageResult:
    """Self-consistency sampling: pi_{k-1} samples `sand.n_samples` actions at every step of D_{k-1}'s
    deliberated share; steps whose candidates disagree are uncertain."""
    check_experiment(exp)
    s = exp.sand
    data, _, trajectories = previous_data(store, exp, k, log)
    checkpoint_ref, checkpoint_path = checkpoint(store, exp, k - 1)
    items = []
    if s.self_consistency:
        work = WorkLog(work_dir(store, "candidates", code, data=data.version,
                                share=s.trajectories if k == 1 else None,
                                agent=agent_identity(exp, checkpoint_path), backend=exp.backend.model_dump(),
                                n=s.n_samples, temperature=s.temperature, seed=s.seed,
                                history=exp.train.history_steps))
        items = candidates_from_frame(work.frame()) if work.exists() else []
        done = {(c.trajectory_id, c.step) for c in items}
        sampled, total = len(done), sum(len(t.steps) for t in trajectories)

        def persist(batch) -> None:
            nonlocal sampled
            work.append(candidates_frame(batch))
            sampled += len(batch)
            log(f"{sampled} of {total} steps sampled")

        with agent_backend(exp, store, checkpoint_ref, backends) as (backend, adapter):
            items += sample_candidates(backend, trajectories, s.n_samples, s.temperature, adapter,
                                       exp.train.history_steps, seed=s.seed, done=done, on_result=persist)
    df = candidates_frame(items)
    written = store.write("candidates", iteration_dataset(exp, k), df,
                          _lineage(lineage_of, "candidates", k, [data, checkpoint_ref]))
    uncertain = int(df["uncertain"].sum())
    log(f"{df.height} steps sampled, {uncertain} uncertain")
    return StageResult({"candidates": written}, {
        "uncertain_steps": uncertain, "uncertain_rate": round(uncertain / df.height, 3) if df.height else 0.0})


def critique(exp: Experiment, store: Store, k: int, backends: BackendFactory, envs: Envs, lineage_of: LineageOf,
             code: str, log: Log = _logger.info) -> StageResult:
    """Execution-guided critique: every candidate of an uncertain step is executed and rolled out by
    pi_{k-1}; the frozen critic writes a critique of each. Writes `rollouts` and `critiques`."""
    check_experiment(exp)
    s = exp.sand
    name = iteration_dataset(exp, k)
    data, _, trajectories = previous_data(store, exp, k, log)
    candidates_ref = store.head("candidates", name)
    candidates = candidates_from_frame(store.read("candidates", name, candidates_ref.version))
    checkpoint_ref, checkpoint_path = checkpoint(store, exp, k - 1)
    rollouts, critiques = [], []
    if s.critique and s.self_consistency:
        critic_id = critic_identity(exp)
        work = work_dir(store, "critiques", code, candidates=candidates_ref.version, data=data.version,
                        critic=critic_id, agent=agent_identity(exp, checkpoint_path), backend=exp.backend.model_dump(),
                        critic_backend=s.critic_backend.model_dump() if s.critic_backend else None,
                        temperature=s.temperature, seed=s.seed, rollout_max_steps=s.rollout_max_steps,
                        critic_max_new_tokens=s.critic_max_new_tokens, max_new_tokens=exp.evaluation.max_new_tokens,
                        history=exp.train.history_steps, envs=envs.settings)
        # A batch's rollouts and critiques are committed together: a resumed run finds both or neither.
        work_log = WorkLog(work)
        rollouts = rollouts_from_frame(work_log.frame("rollouts")) if work_log.exists("rollouts") else []
        critiques = critiques_from_frame(work_log.frame("critiques")) if work_log.exists("critiques") else []
        reported, total = len(critiques), sum(len(c.candidates) for c in candidates if c.uncertain)
        done = {r.key: r for r in rollouts}

        def persist(new_rollouts, new_critiques) -> None:
            nonlocal reported
            work_log.append_together(rollouts=rollouts_frame(new_rollouts), critiques=critiques_frame(new_critiques))
            reported += len(new_critiques)
            log(f"{reported} of {total} critiques written")

        params = SamplingParams(temperature=s.temperature, max_new_tokens=exp.evaluation.max_new_tokens, stop=STOP,
                                seed=s.seed)
        with agent_backend(exp, store, checkpoint_ref, backends) as (backend, adapter), \
                critic_backend(exp, backends, backend, adapter) as critic:
            for env_name in sorted({t.env for t in trajectories}):
                ids = {t.id for t in trajectories if t.env == env_name}
                mine = [c for c in candidates if c.trajectory_id in ids]
                with RolloutEngine(backend, envs.factory(env_name), exp.evaluation.pool_size, params,
                                   exp.train.history_steps) as engine:
                    new_r, new_c = critique_candidates(
                        engine, critic, [t for t in trajectories if t.id in ids], mine, adapter,
                        s.rollout_max_steps, critic_id, max_new_tokens=s.critic_max_new_tokens, done=done,
                        on_result=persist)
                rollouts, critiques = rollouts + new_r, critiques + new_c
    inputs = [data, candidates_ref, checkpoint_ref]
    rollouts_written = store.write("rollouts", name, rollouts_frame(rollouts),
                                   _lineage(lineage_of, "rollouts", k, inputs))
    df = critiques_frame(critiques)
    written = store.write("critiques", name, df, _lineage(lineage_of, "critiques", k, [*inputs, rollouts_written.ref],
                                                          critic=critic_model(exp)))
    verdicts = dict(df.group_by("verdict").len().iter_rows()) if df.height else {}
    return StageResult({"rollouts": rollouts_written, "critiques": written}, {
        "rollouts": len(rollouts), "critiques": df.height, **critique_quality(critiques),
        **{f"verdict/{v}": n for v, n in verdicts.items()}})


def synthesize(exp: Experiment, store: Store, k: int, backends: BackendFactory, lineage_of: LineageOf,
               log: Log = _logger.info) -> StageResult:
    """D_k: the writer's deliberation thought replaces the thought at uncertain steps, ending at the expert
    action; confident steps keep theirs, and trajectories outside the deliberated share are carried over
    unchanged. Writes `deliberations` and D_k in `trajectories`."""
    check_experiment(exp)
    s = exp.sand
    name = iteration_dataset(exp, k)
    data, previous, trajectories = previous_data(store, exp, k, log)
    refs = {t: store.head(t, name) for t in ("candidates", "rollouts", "critiques")}
    candidates = candidates_from_frame(store.read("candidates", name)) if s.self_consistency else None
    critiques = critiques_from_frame(store.read("critiques", name)) if s.critique and s.self_consistency else None
    rollouts = rollouts_from_frame(store.read("rollouts", name)) if critiques is not None else None
    with critic_backend(exp, backends) as writer:
        result = synthesize_deliberations(writer, trajectories, candidates, critiques, rollouts, s.expert_switch,
                                          max_new_tokens=s.writer_max_new_tokens)
    inputs = [data, *refs.values()]
    deliberations = store.write("deliberations", name, deliberations_frame(result.deliberations),
                                _lineage(lineage_of, "deliberations", k, inputs))
    made = {t.id: d for t, d in zip(trajectories, result.dataset, strict=True)}
    dk = to_frame([made.get(t.id, t) for t in previous])  # D_{k-1}'s order; the rest carried unchanged
    written = store.write("trajectories", name, dk, _lineage(lineage_of, "trajectories", k,
                                                             [*inputs, deliberations.ref], writer=critic_model(exp)))
    log(f"{len(result.deliberations)} deliberations, {result.fallbacks} fallbacks")
    return StageResult({"deliberations": deliberations, "trajectories": written}, {
        "deliberations": len(result.deliberations), "fallbacks": result.fallbacks, "retries": result.retries,
        "switched": len(result.switched), **deliberation_quality(result.deliberations)})


def train_here(plan: TrainPlan) -> dict:
    """Train in this process (the Dagster asset launches the same training in a child process instead)."""
    from sand.training.sft import train

    return train(plan.spec)


def finetune(exp: Experiment, store: Store, k: int, lineage_of: LineageOf,
             train: Callable[[TrainPlan], dict] = train_here, log: Log = _logger.info) -> StageResult:
    """pi_k: the base model trained on D_0 (k = 0), or pi_{k-1} on D_k (continued, not restarted). A plan
    already trained (same base, data, start, settings and training code) is found, not trained again."""
    check_experiment(exp)
    data = store.head("trajectories", iteration_dataset(exp, k))
    if data is None:
        raise LookupError(f"{exp.name}: no {iteration_dataset(exp, k)} in {store.home} to train on")
    init = checkpoint(store, exp, k - 1)[1] if k > 0 else None
    plan = plan_training(exp, store, k, data, init)
    log(f"training {plan.output} on {data.dataset}@{data.version}")
    metrics = train(plan)
    lineage = _lineage(lineage_of, "checkpoints", k, [data], checkpoint=str(plan.output),
                       base_model_hash=plan.base_model_hash)
    row = checkpoint_row(exp, plan, lineage.asset, k, metrics)
    written = store.write("checkpoints", checkpoint_dataset(exp, k), pl.DataFrame([row]), lineage)
    return StageResult({"checkpoints": written}, {
        "examples": metrics["examples"], "train_steps": metrics["steps"], "final_loss": metrics["final_loss"],
        "seconds": metrics["seconds"], "tokens_per_second": metrics["tokens_per_second"],
        "resumed": metrics.get("resumed", False)})


def evaluate_agent(exp: Experiment, store: Store, agent: str, iteration: int | None, backends: BackendFactory,
                   envs: Envs, lineage_of: LineageOf, code: str, log: Log = _logger.info) -> EvaluationResult:
    """Greedy episodes of `agent` ("base": the base model; else pi_iteration) on the experiment's evaluation
    splits; one row per episode in `evaluations` <exp>/<agent>. Finished episodes are reused for the same
    agent weights, backend and evaluation settings."""
    check_experiment(exp)
    from sand.evaluation import evaluate

    checkpoint_ref, path = checkpoint(store, exp, iteration) if iteration is not None else (None, None)
    work = work_dir(store, "evaluation", code, agent=agent_identity(exp, path), backend=exp.backend.model_dump(),
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
    written = store.write("evaluations", f"{exp.name}/{agent}", pl.DataFrame(rows), _lineage(
        lineage_of, "evaluations", iteration, [checkpoint_ref] if checkpoint_ref else [], agent=agent))
    # Intervals and paired comparisons with the other agents, stored for the catalog; numeric metadata per split.
    metadata = record_uncertainty(store, exp.name, agent, _lineage(
        lineage_of, "evaluation_intervals", iteration, [written.ref], agent=agent))
    return EvaluationResult({"evaluations": written}, metadata, planned=planned)


def missing_episodes(result: EvaluationResult) -> list[tuple[str, str, str]]:
    """Planned episodes without a row in the evaluation written."""
    stored = set(result.written["evaluations"].rows.select("env", "split", "task_id").iter_rows())
    return [p for p in result.planned if p not in stored]


def run_iteration(exp: Experiment, store: Store, k: int, backends: BackendFactory, envs: Envs,
                  lineage_of: LineageOf, train: Callable[[TrainPlan], dict] = train_here,
                  log: Log = _logger.info) -> dict[str, StageResult]:
    """SAND iteration k from the store: D_{k-1} and pi_{k-1} -> candidates, rollouts and critiques, D_k,
    pi_k and its evaluation (each stage's result by name)."""
    code = stage_code("loop")
    results = {"sample": sample(exp, store, k, backends, lineage_of, code, log)}
    results["critique"] = critique(exp, store, k, backends, envs, lineage_of, code, log)
    results["synthesize"] = synthesize(exp, store, k, backends, lineage_of, log)
    results["finetune"] = finetune(exp, store, k, lineage_of, train, log)
    results["evaluate"] = evaluate_agent(exp, store, f"iter_{k}", k, backends, envs, lineage_of,
                                         stage_code("evaluation"), log)
    return results
