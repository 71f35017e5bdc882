"""Execution-guided critique: every candidate of an uncertain step rolled out and judged."""
from __future__ import annotations

from sand.experiment import Experiment
from sand.models.backends import SamplingParams
from sand.models.serving import (
    BackendFactory,
    agent_backend,
    agent_identity,
    backend_settings,
    critic_backend,
    critic_identity,
    critic_model,
)
from sand.preflight import check_experiment
from sand.react import REPLY_STOP
from sand.rollout import RolloutEngine
from sand.runners.common import (
    Envs,
    LineageOf,
    Log,
    StageResult,
    default_log,
    iteration_dataset,
    stage_lineage,
    work_dir,
)
from sand.runners.inputs import checkpoint, previous_data
from sand.sand_loop.critique import critique_candidates
from sand.sand_loop.quality import critique_quality
from sand.sand_loop.tables import (
    candidates_from_frame,
    critiques_frame,
    critiques_from_frame,
    rollouts_frame,
    rollouts_from_frame,
)
from sand.store import Store
from sand.worklog import WorkLog


def critique(exp: Experiment, store: Store, k: int, backends: BackendFactory, envs: Envs, lineage_of: LineageOf,
             code: str, log: Log = default_log) -> StageResult:
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
                        critic=critic_id, agent=agent_identity(exp, checkpoint_path),
                        backend=backend_settings(exp.backend),
                        critic_backend=backend_settings(s.critic_backend) if s.critic_backend else None,
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

        params = SamplingParams(temperature=s.temperature, max_new_tokens=exp.evaluation.max_new_tokens,
                                stop=REPLY_STOP, seed=s.seed)
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
                                   stage_lineage(lineage_of, "rollouts", k, inputs))
    df = critiques_frame(critiques)
    written = store.write("critiques", name, df, stage_lineage(
        lineage_of, "critiques", k, [*inputs, rollouts_written.ref], critic=critic_model(exp),
        backend=backend_settings(s.critic_backend or exp.backend)))
    verdicts = dict(df.group_by("verdict").len().iter_rows()) if df.height else {}
    return StageResult({"rollouts": rollouts_written, "critiques": written}, {
        "dtype": backend_settings(s.critic_backend or exp.backend)["options"].get("dtype"),
        "rollouts": len(rollouts), "critiques": df.height, **critique_quality(critiques),
        **{f"verdict/{v}": n for v, n in verdicts.items()}})
