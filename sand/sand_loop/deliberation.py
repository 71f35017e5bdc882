"""A deliberation record: one synthesised thought with how it was made and checked (`sand.sand_loop.synthesis`
writes them). Its own module, so the tables and quality figures that read deliberations do not make sampling
and critique depend on the writer's code (each stage's code version covers what it imports)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Deliberation:
    trajectory_id: str
    step: int
    thought: str
    answer: str  # the action the thought concludes with (the expert's, or the switched-to candidate)
    candidates: list[str]  # the normalised actions it weighs (no_sampling: those the writer named)
    fallback: bool  # the writer failed validation twice: the thought is written from the evidence
    retried: bool
    mode: str  # "sand", "no_critique" or "no_sampling"
    rejection: str | None  # why the writer's last thought was rejected (None: accepted)
    repeated: bool  # a thought the writer wrote repeated itself (a sentence, or a clause quoting an action)
    named: int  # distinct candidates the stored thought names in double quotes
    valid: bool  # the stored thought passes the validator
