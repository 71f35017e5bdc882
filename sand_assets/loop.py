"""The SAND loop, unrolled per iteration so the UI shows every edge (architecture.md, "The asset graph"):

  D_{k-1} + pi_{k-1} ─► iter_k/candidate_samples ─► iter_k/action_critiques ─► iter_k/deliberation_dataset (D_k)
  D_k + pi_{k-1} ─► iter_k/finetuned_checkpoint (pi_k) ─► iter_k/evaluation

Each stage writes its catalog table (`candidates`, `rollouts` + `critiques`, `deliberations` + D_k in
`trajectories`, `checkpoints`, `evaluations`) as dataset `<exp>/iter_k`, with a lineage row naming the
exact versions it read. Sampling and critique persist their work as it finishes (a work log under
SAND_HOME/work) so an interrupted materialization resumes where it stopped.
"""
from contextlib import nullcontext

from dagster import AssetExecutionContext, AssetKey, AssetsDefinition, MaterializeResult, PipesSubprocessClient, asset

from resources import AlfWorldResource, ComputeResource, SciWorldResource, StoreResource
from sand.experiment import Experiment
from sand.models.backends import SamplingParams
from sand.rollout import RolloutEngine
from sand.sand_loop import critique_candidates, sample_candidates, synthesize
from sand.sand_loop.critique import CandidateKey
from sand.sand_loop.sampling import STOP
from sand.sand_loop.tables import (
    candidates_frame,
    candidates_from_frame,
    critiques_frame,
    critiques_from_frame,
    deliberations_frame,
    rollouts_frame,
    rollouts_from_frame,
)
from sand.selection import training_subset
from sand.store import DatasetRef, Store
from sand.trajectory import from_frame, to_frame
from sand.versioning import code_version
from sand.worklog import WorkLog
from sand_assets.common import dataset_result, env_factory, lineage_for, work_dir
from sand_assets.models import (
    agent_backend,
    agent_identity,
    checkpoint_dataset,
    evaluation_data,
    make_backend_for,
    run_evaluation,
    train_checkpoint,
)

# Trajectories the environments can replay (imported ETO data names games this machine may not have).
REPLAYABLE_SOURCES = {"gold", "observer", "planner", "sand"}


def iteration_dataset(exp: Experiment, k: int) -> str:
    """D_k's dataset name in `trajectories` (D_0: the experiment's share of the expert set)."""
    return f"{exp.name}/d0" if k == 0 else f"{exp.name}/iter_{k}"


def _key(exp: Experiment, k: int, name: str) -> AssetKey:
    return AssetKey([exp.name, f"iter_{k}", name])


def _checkpoint(store: Store, exp: Experiment, k: int) -> tuple[DatasetRef, str]:
    """pi_k: its checkpoint record and folder."""
    ref = store.head("checkpoints", checkpoint_dataset(exp, k))
    return ref, store.read("checkpoints", ref.dataset, ref.version)["path"][0]


def _previous_data(store: Store, exp: Experiment, k: int, context: AssetExecutionContext):
    """(ref of D_{k-1}, all its trajectories, those iteration k deliberates over).

    Iteration 1 deliberates over the share of D_0 `sand.trajectories` names (all of it by default), later
    iterations over what the previous one deliberated; trajectories the environments here cannot replay
    (imported data) are never deliberated. D_k carries every other trajectory of D_{k-1} unchanged, so the
    agent keeps training on all of its data."""
    ref = store.head("trajectories", iteration_dataset(exp, k - 1))
    frame = store.read("trajectories", ref.dataset, ref.version)
    trajectories = from_frame(frame)
    if k > 1:
        chosen = [t for t in trajectories if t.source == "sand"]
    else:
        share = {r["id"] for r in training_subset(frame, exp.sand.trajectories).iter_rows(named=True)} \
            if exp.sand.trajectories is not None else {t.id for t in trajectories}
        chosen = [t for t in trajectories if t.id in share and t.source in REPLAYABLE_SOURCES]
        unplayable = sum(t.id in share and t.source not in REPLAYABLE_SOURCES for t in trajectories)
        if unplayable:
            context.log.warning(f"{unplayable} trajectories of {ref.dataset} cannot be replayed in the environments "
                                "here (imported data): D_1 carries them unchanged")
    return ref, trajectories, chosen


def build_loop_assets(exp: Experiment) -> list[AssetsDefinition]:
    assets = []
    loop_code = code_version("sand.sand_loop.sampling", "sand.sand_loop.critique", "sand.sand_loop.synthesis",
                             "sand.sand_loop.actions", "sand.rollout", "sand.react", prompts=True)
    settings = exp.sand
    previous_checkpoint = AssetKey([exp.name, "sft_checkpoint"])
    previous_data = previous_checkpoint  # D_0's share is written by the SFT asset
    for k in range(1, settings.iterations + 1):
        assets += _iteration(exp, k, previous_data, previous_checkpoint, loop_code)
        previous_data, previous_checkpoint = _key(exp, k, "deliberation_dataset"), _key(exp, k, "finetuned_checkpoint")
    return assets


def _iteration(exp: Experiment, k: int, data_key: AssetKey, checkpoint_key: AssetKey, loop_code: str):
    s = exp.sand
    group = exp.name

    @asset(key=_key(exp, k, "candidate_samples"), group_name=group, deps=[data_key, checkpoint_key], pool="gpu",
           kinds={"python", "parquet"}, code_version=loop_code,
           description=f"Self-consistency sampling: pi_{k - 1} samples {s.n_samples} actions at every step of "
                       f"D_{k - 1}; steps whose candidates disagree are uncertain.")
    def candidate_samples(context: AssetExecutionContext, store: StoreResource,
                          compute: ComputeResource) -> MaterializeResult:
        db = store.store()
        data, _, trajectories = _previous_data(db, exp, k, context)
        checkpoint, checkpoint_path = _checkpoint(db, exp, k - 1)
        items = []
        if s.self_consistency:
            log = WorkLog(work_dir(context, db, "candidates", data=data.version,
                                   share=s.trajectories if k == 1 else None, agent=agent_identity(exp, checkpoint_path),
                                   backend=exp.backend.model_dump(), n=s.n_samples, temperature=s.temperature,
                                   seed=s.seed, history=exp.train.history_steps))
            items = candidates_from_frame(log.frame()) if log.exists() else []
            done = {(c.trajectory_id, c.step) for c in items}
            sampled, total = len(done), sum(len(t.steps) for t in trajectories)

            def persist(batch) -> None:
                nonlocal sampled
                log.append(candidates_frame(batch))
                sampled += len(batch)
                context.log.info(f"{sampled} of {total} steps sampled")

            with agent_backend(exp, compute, db, checkpoint) as (backend, adapter):
                items += sample_candidates(backend, trajectories, s.n_samples, s.temperature, adapter,
                                           exp.train.history_steps, seed=s.seed, done=done, on_result=persist)
        df = candidates_frame(items)
        written = db.write("candidates", f"{exp.name}/iter_{k}", df,
                           lineage_for(context, iteration=k, inputs=[data, checkpoint]))
        uncertain = df["uncertain"].sum()
        context.log.info(f"{df.height} steps sampled, {uncertain} uncertain")
        return dataset_result(written, uncertain_steps=int(uncertain),
                              uncertain_rate=round(uncertain / df.height, 3) if df.height else 0.0)

    @asset(key=_key(exp, k, "action_critiques"), group_name=group, deps=[candidate_samples], pool="gpu",
           kinds={"python", "parquet"}, code_version=loop_code,
           description="Execution-guided critique: every candidate of an uncertain step is executed and rolled "
                       f"out by pi_{k - 1}; the frozen base model writes a critique of each.")
    def action_critiques(context: AssetExecutionContext, store: StoreResource, compute: ComputeResource,
                         sciworld: SciWorldResource, alfworld: AlfWorldResource) -> MaterializeResult:
        db = store.store()
        data, _, trajectories = _previous_data(db, exp, k, context)
        candidates_ref = db.head("candidates", f"{exp.name}/iter_{k}")
        candidates = candidates_from_frame(db.read("candidates", candidates_ref.dataset, candidates_ref.version))
        checkpoint, checkpoint_path = _checkpoint(db, exp, k - 1)
        rollouts, critiques = [], []
        if s.critique and s.self_consistency:
            from sand.models.registry import model_hash, resolve_model

            critic = f"{exp.base_model}@{model_hash(resolve_model(exp.base_model))}"
            work = work_dir(context, db, "critiques", candidates=candidates_ref.version, data=data.version,
                            critic=critic, agent=agent_identity(exp, checkpoint_path), backend=exp.backend.model_dump(),
                            temperature=s.temperature, seed=s.seed, rollout_max_steps=s.rollout_max_steps,
                            critic_max_new_tokens=s.critic_max_new_tokens,
                            max_new_tokens=exp.evaluation.max_new_tokens, history=exp.train.history_steps,
                            envs={"sciworld": sciworld.model_dump(), "alfworld": alfworld.model_dump()})
            rollout_log, critique_log = WorkLog(work / "rollouts"), WorkLog(work / "critiques")
            rollouts = rollouts_from_frame(rollout_log.frame()) if rollout_log.exists() else []
            critiques = critiques_from_frame(critique_log.frame()) if critique_log.exists() else []
            critiqued = {candidate_key_of(c) for c in critiques}
            reported, total = len(critiques), sum(len(c.candidates) for c in candidates if c.uncertain)
            done = {candidate_key_of(r): r.reward for r in rollouts if candidate_key_of(r) in critiqued}

            def persist(new_rollouts, new_critiques):
                nonlocal reported
                rollout_log.append(rollouts_frame(new_rollouts))
                critique_log.append(critiques_frame(new_critiques))
                reported += len(new_critiques)
                context.log.info(f"{reported} of {total} critiques written")

            params = SamplingParams(temperature=s.temperature, max_new_tokens=exp.evaluation.max_new_tokens, stop=STOP,
                                    seed=s.seed)
            with agent_backend(exp, compute, db, checkpoint) as (backend, adapter), \
                    (nullcontext(backend) if adapter else make_backend_for(exp, compute)) as critic_backend:
                for env_name in sorted({t.env for t in trajectories}):
                    ids = {t.id for t in trajectories if t.env == env_name}
                    mine = [c for c in candidates if c.trajectory_id in ids]
                    with RolloutEngine(backend, env_factory(env_name, sciworld, alfworld),
                                       exp.evaluation.pool_size, params, exp.train.history_steps) as engine:
                        new_r, new_c = critique_candidates(
                            engine, critic_backend, [t for t in trajectories if t.id in ids], mine, adapter,
                            s.rollout_max_steps, critic, max_new_tokens=s.critic_max_new_tokens, done=done,
                            on_result=persist)
                    rollouts, critiques = rollouts + new_r, critiques + new_c
        inputs = [data, candidates_ref, checkpoint]
        rollout_written = db.write("rollouts", f"{exp.name}/iter_{k}", rollouts_frame(rollouts),
                                   lineage_for(context, iteration=k, inputs=inputs))
        df = critiques_frame(critiques)
        written = db.write("critiques", f"{exp.name}/iter_{k}", df, lineage_for(
            context, iteration=k, inputs=[*inputs, rollout_written.ref], metadata={"critic": exp.base_model}))
        verdicts = dict(df.group_by("verdict").len().iter_rows()) if df.height else {}
        return dataset_result(written, rollouts=len(rollouts), critiques=df.height,
                              inferred_verdicts=int(df["verdict_inferred"].sum()) if df.height else 0,
                              **{f"verdict/{v}": n for v, n in verdicts.items()})

    @asset(key=_key(exp, k, "deliberation_dataset"), group_name=group, deps=[action_critiques], pool="gpu",
           kinds={"python", "parquet"}, code_version=loop_code,
           description=f"D_{k}: the base model's deliberation thought replaces the thought at uncertain steps, "
                       "ending at the expert action; confident steps keep theirs, and trajectories outside the "
                       "deliberated share are carried over unchanged.")
    def deliberation_dataset(context: AssetExecutionContext, store: StoreResource,
                             compute: ComputeResource) -> MaterializeResult:
        db = store.store()
        data, previous, trajectories = _previous_data(db, exp, k, context)
        name = f"{exp.name}/iter_{k}"
        refs = {t: db.head(t, name) for t in ("candidates", "rollouts", "critiques")}
        candidates = candidates_from_frame(db.read("candidates", name)) if s.self_consistency else None
        critiques = critiques_from_frame(db.read("critiques", name)) if s.critique and s.self_consistency else None
        rollouts = rollouts_from_frame(db.read("rollouts", name)) if critiques is not None else None
        with make_backend_for(exp, compute) as writer:
            result = synthesize(writer, trajectories, candidates, critiques, rollouts, s.expert_switch,
                                max_new_tokens=s.writer_max_new_tokens)
        inputs = [data, *refs.values()]
        deliberations = db.write("deliberations", name, deliberations_frame(result.deliberations),
                                 lineage_for(context, iteration=k, inputs=inputs))
        made = {t.id: d for t, d in zip(trajectories, result.dataset, strict=True)}
        df = to_frame([made.get(t.id, t) for t in previous])  # D_{k-1}'s order; the rest carried unchanged
        written = db.write("trajectories", name, df, lineage_for(
            context, iteration=k, inputs=[*inputs, deliberations.ref], metadata={"writer": exp.base_model}))
        return dataset_result(written, deliberations=len(result.deliberations), fallbacks=result.fallbacks,
                              retries=result.retries, switched=len(result.switched))

    @asset(key=_key(exp, k, "finetuned_checkpoint"), group_name=group, deps=[deliberation_dataset, checkpoint_key],
           pool="gpu", kinds={"pytorch"},
           code_version=code_version("sand.training.sft", "sand.react", prompts=True),
           description=f"pi_{k}: pi_{k - 1} finetuned on D_{k} (continued, not restarted from the base model).")
    def finetuned_checkpoint(context: AssetExecutionContext, store: StoreResource,
                             pipes: PipesSubprocessClient) -> MaterializeResult:
        db = store.store()
        _, init = _checkpoint(db, exp, k - 1)
        return train_checkpoint(context, exp, db, k, db.head("trajectories", iteration_dataset(exp, k)), init, pipes)

    @asset(key=_key(exp, k, "evaluation"), group_name=group, deps=[finetuned_checkpoint, *evaluation_data(exp)],
           pool="gpu", kinds={"python"}, code_version=code_version("sand.evaluation", "sand.rollout", "sand.react",
                                                       "sand.selection", prompts=True),
           description=f"pi_{k}, greedy, on the evaluation splits.")
    def evaluation(context: AssetExecutionContext, store: StoreResource, compute: ComputeResource,
                   sciworld: SciWorldResource, alfworld: AlfWorldResource) -> MaterializeResult:
        db = store.store()
        return run_evaluation(context, exp, db, compute, sciworld, alfworld, f"iter_{k}", k,
                              db.head("checkpoints", checkpoint_dataset(exp, k)))

    return [candidate_samples, action_critiques, deliberation_dataset, finetuned_checkpoint, evaluation]


def candidate_key_of(row) -> CandidateKey:
    """The CandidateKey of a stored rollout or critique."""
    return CandidateKey(row.task_id, row.prefix_len, row.prefix_digest, row.action)
