"""Deliberation synthesis: thoughts at uncertain steps, and D_k."""
from __future__ import annotations

from sand.experiment import Experiment
from sand.models.serving import (
    BackendFactory,
    agent_token_counter,
    backend_settings,
    critic_backend,
    critic_identity,
    critic_model,
)
from sand.preflight import check_experiment
from sand.runners.common import (
    LineageOf,
    Log,
    StageResult,
    default_log,
    iteration_dataset,
    stage_lineage,
    work_dir,
)
from sand.runners.inputs import previous_data
from sand.sand_loop.quality import deliberation_quality
from sand.sand_loop.synthesis import synthesize as synthesize_deliberations
from sand.sand_loop.tables import (
    candidates_from_frame,
    critiques_from_frame,
    deliberations_frame,
    deliberations_from_frame,
    rollouts_from_frame,
)
from sand.store import Store
from sand.trajectory import to_frame
from sand.worklog import WorkLog


def synthesize(exp: Experiment, store: Store, k: int, backends: BackendFactory, lineage_of: LineageOf,
               code: str, log: Log = default_log) -> StageResult:
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
    work = WorkLog(work_dir(store, "deliberations", code, data=data.version,
                            **{t: ref.version if ref else None for t, ref in refs.items()},
                            writer=critic_identity(exp), backend=backend_settings(exp.backend),
                            critic_backend=backend_settings(s.critic_backend) if s.critic_backend else None,
                            self_consistency=s.self_consistency, critique=s.critique, expert_switch=s.expert_switch,
                            deliberate=s.deliberate, thought_form=s.thought_form,
                            writer_max_new_tokens=s.writer_max_new_tokens,
                            reply_tokens=exp.evaluation.max_new_tokens, agent_model=exp.base_model))
    done = {(d.trajectory_id, d.step): d for d in deliberations_from_frame(work.frame())} if work.exists() else {}
    written = len(done)

    def persist(batch) -> None:
        nonlocal written
        work.append(deliberations_frame(batch))
        written += len(batch)
        log(f"{written} deliberations written")

    with critic_backend(exp, backends) as writer:
        result = synthesize_deliberations(writer, trajectories, candidates, critiques, rollouts, s.expert_switch,
                                          max_new_tokens=s.writer_max_new_tokens, done=done, on_result=persist,
                                          reply_tokens=exp.evaluation.max_new_tokens,
                                          count_tokens=agent_token_counter(exp, writer), deliberate=s.deliberate,
                                          thought_form=s.thought_form)
    inputs = [data, *refs.values()]
    deliberations = store.write("deliberations", name, deliberations_frame(result.deliberations),
                                stage_lineage(lineage_of, "deliberations", k, inputs,
                                              backend=backend_settings(s.critic_backend or exp.backend)))
    made = {t.id: d for t, d in zip(trajectories, result.dataset, strict=True)}
    dk = to_frame([made.get(t.id, t) for t in previous])  # D_{k-1}'s order; the rest carried unchanged
    written = store.write("trajectories", name, dk, stage_lineage(
        lineage_of, "trajectories", k, [*inputs, deliberations.ref], writer=critic_model(exp)))
    log(f"{len(result.deliberations)} deliberations, {result.fallbacks} fallbacks")
    if result.unfit:
        log(f"{len(result.unfit)} uncertain steps keep their thought: no deliberation naming two candidates fits "
            f"the agent's reply budget of {exp.evaluation.max_new_tokens} tokens (evaluation.max_new_tokens)")
    return StageResult({"deliberations": deliberations, "trajectories": written}, {
        "dtype": backend_settings(s.critic_backend or exp.backend)["options"].get("dtype"),
        "deliberations": len(result.deliberations), "fallbacks": result.fallbacks, "retries": result.retries,
        "switched": len(result.switched), "unfit": len(result.unfit), "alike": len(result.alike),
        **deliberation_quality(result.deliberations)})
