"""The engine stages of one SAND iteration (design/sand-method.md, "The loop", steps 1-3), plain Python.

    sample_candidates   pi_k samples n actions at each expert step -> StepCandidates (uncertain or not)
    critique_candidates each candidate of an uncertain step is rolled out by pi_k and judged by pi_base
    synthesize          pi_base writes one deliberation per uncertain step -> Deliberations and D_k

Each stage returns dataclasses; `sand.sand_loop.tables` turns them into the catalog tables and back.
`run_iteration` chains the stages with the paper's ablation switches; the Dagster assets call the
stages one by one so that each persists (and resumes) on its own.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sand.envs.base import Environment
from sand.models.backends import Backend, SamplingParams
from sand.rollout import RolloutEngine
from sand.sand_loop.critique import Critique, Rollout, critique_candidates
from sand.sand_loop.sampling import STOP, StepCandidates, sample_candidates
from sand.sand_loop.synthesis import DELIBERATION_PREFIX, Synthesis, synthesize
from sand.trajectory import Trajectory

__all__ = ["DELIBERATION_PREFIX", "IterationResult", "critique_candidates", "run_iteration",
           "sample_candidates", "synthesize"]


@dataclass
class IterationResult:
    candidates: list[StepCandidates]  # empty without self-consistency sampling
    rollouts: list[Rollout]  # empty without execution-guided critique
    critiques: list[Critique]
    synthesis: Synthesis


def run_iteration(agent: Backend, writer: Backend, make_env: Callable[[], Environment],
                  trajectories: list[Trajectory], adapter: str | None = None, n_samples: int = 5,
                  temperature: float = 1.0, rollout_max_steps: int | None = None, history_steps: int | None = None,
                  self_consistency: bool = True, critique: bool = True, expert_switch: bool = False,
                  pool_size: int = 4, critic_id: str = "base") -> IterationResult:
    """One SAND iteration in memory: D_{k-1} and pi_k (`agent` with `adapter`) -> D_k.

    `writer` is pi_base (it may be the same backend as `agent`: it always runs without the adapter).
    `self_consistency=False`: no sampling, no rollouts, every step deliberates over invented alternatives.
    `critique=False`: sampled candidates, no rollouts, no critiques.
    """
    if not self_consistency:
        return IterationResult([], [], [], synthesize(writer, trajectories, None))
    candidates = sample_candidates(agent, trajectories, n_samples, temperature, adapter, history_steps)
    rollouts, critiques = [], None
    if critique:
        params = SamplingParams(temperature=temperature, max_new_tokens=96, stop=STOP)
        with RolloutEngine(agent, make_env, pool_size, params, history_steps) as engine:
            rollouts, critiques = critique_candidates(engine, writer, trajectories, candidates, adapter,
                                                      rollout_max_steps, critic_id)
    synthesis = synthesize(writer, trajectories, candidates, critiques, rollouts if critique else None, expert_switch)
    return IterationResult(candidates, rollouts, critiques or [], synthesis)
