"""The engine stages of one SAND iteration (steps 1-3 of the loop), plain Python.

    sample_candidates   pi_k samples n actions at each expert step -> StepCandidates (uncertain or not)
    critique_candidates each candidate of an uncertain step is rolled out by pi_k and judged by pi_base
    synthesize          pi_base writes one deliberation per uncertain step -> Deliberations and D_k

Each stage returns dataclasses; `sand.sand_loop.tables` turns them into the catalog tables and back.
`sand.stages` runs them over the store (selecting inputs, resuming, persisting), one stage at a time or a
whole iteration (`sand.stages.run_iteration`).
"""
from sand.sand_loop.critique import critique_candidates
from sand.sand_loop.sampling import sample_candidates
from sand.sand_loop.synthesis import DELIBERATION_PREFIX, synthesize

__all__ = ["DELIBERATION_PREFIX", "critique_candidates", "sample_candidates", "synthesize"]
