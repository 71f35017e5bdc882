"""The engine stages of one SAND iteration (steps 1-3 of the loop), plain Python.

    sampling.sample_candidates     pi_k samples n actions at each expert step -> StepCandidates (uncertain or not)
    critique.critique_candidates   each candidate of an uncertain step is rolled out by pi_k and judged by pi_base
    synthesis.synthesize           pi_base writes one deliberation per uncertain step -> Deliberations and D_k

Each stage returns dataclasses; `sand.sand_loop.tables` turns them into the catalog tables and back.
`sand.stages` runs them over the store (selecting inputs, resuming, persisting), one stage at a time or a
whole iteration (`sand.stages.run_iteration`).

Import the stage modules themselves: this package imports none of them, so a stage's code version (the
modules it imports) does not cover the other stages.
"""
