"""Self-consistency sampling: candidate actions at every step of D_{k-1}."""
from __future__ import annotations

from sand.experiment import Experiment
from sand.models.serving import (
    BackendFactory,
    agent_backend,
    agent_identity,
    backend_settings,
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
from sand.runners.inputs import checkpoint, previous_data
from sand.sand_loop.sampling import sample_candidates
from sand.sand_loop.tables import (
    candidates_frame,
    candidates_from_frame,
)
from sand.store import Store
from sand.worklog import WorkLog


def sample(exp: Experiment, store: Store, k: int, backends: BackendFactory, lineage_of: LineageOf,
           code: str, log: Log = default_log) -> StageResult:
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
                                agent=agent_identity(exp, checkpoint_path), backend=backend_settings(exp.backend),
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
                          stage_lineage(lineage_of, "candidates", k, [data, checkpoint_ref],
                                        backend=backend_settings(exp.backend)))
    uncertain = int(df["uncertain"].sum())
    log(f"{df.height} steps sampled, {uncertain} uncertain")
    return StageResult({"candidates": written}, {"dtype": backend_settings(exp.backend)["options"].get("dtype"),
        "uncertain_steps": uncertain, "uncertain_rate": round(uncertain / df.height, 3) if df.height else 0.0})
