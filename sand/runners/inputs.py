"""The inputs of a SAND iteration as the store holds them: pi_k's checkpoint and D_{k-1}'s trajectories."""
from __future__ import annotations

from sand.experiment import Experiment
from sand.models.checkpoints import checkpoint_dataset
from sand.runners.common import Log, default_log, iteration_dataset
from sand.selection import replayable, training_subset
from sand.store import DatasetRef, Store
from sand.trajectory import Trajectory, from_frame


def checkpoint(store: Store, exp: Experiment, k: int, control: bool = False) -> tuple[DatasetRef, str]:
    """pi_k (or with `control`, its compute-matched control): its checkpoint record and folder."""
    ref = store.head("checkpoints", checkpoint_dataset(exp, k, control))
    if ref is None:
        what = f"the control of iteration {k}" if control else f"iteration {k}"
        raise LookupError(f"{exp.name}: no checkpoint of {what} in {store.home} (train it first)")
    return ref, str(store.resolve(store.read("checkpoints", ref.dataset, ref.version)["path"][0]))


def previous_data(store: Store, exp: Experiment, k: int,
                  log: Log = default_log) -> tuple[DatasetRef, list[Trajectory], list[Trajectory]]:
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
