"""Self-consistency action sampling: which expert steps the agent is unsure about.

At every step t of every expert trajectory the agent pi_k sees the expert prefix (the conversation up
to the observation before step t, as the rollout engine would prompt it: `sand.rollout.agent_prompt`)
and samples n replies. The parsed actions, normalised and de-duplicated together with the expert action,
form the step's candidate set; a set of more than one action marks the step as uncertain (to deliberate),
a single one as confident (kept as is).
"""
from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from sand.models.backends import Backend, SamplingParams
from sand.react import REPLY_STOP, parse_reply
from sand.rollout import agent_prompt
from sand.sand_loop.actions import normalize
from sand.trajectory import Trajectory


@dataclass
class StepCandidates:
    trajectory_id: str
    step: int
    expert_action: str  # exactly as in the trajectory
    candidates: list[str]  # distinct normalised actions, the expert's first
    n_samples: int
    format_errors: int  # samples without a usable action line (not candidates)
    uncertain: bool
    samples: list[str]  # the raw sampled replies

    @property
    def alternatives(self) -> list[str]:
        return self.candidates[1:]


def collect_candidates(trajectory_id: str, step: int, env: str, expert_action: str,
                       samples: list[str]) -> StepCandidates:
    """The candidate set of one step from its sampled replies."""
    candidates = [normalize(expert_action, env)]
    errors = 0
    for text in samples:
        action = parse_reply(text).action
        if action is None or not normalize(action, env):
            errors += 1
        elif normalize(action, env) not in candidates:
            candidates.append(normalize(action, env))
    return StepCandidates(trajectory_id, step, expert_action, candidates, len(samples), errors,
                          len(candidates) > 1, list(samples))


def sample_candidates(backend: Backend, trajectories: list[Trajectory], n: int = 5, temperature: float = 1.0,
                      adapter: str | None = None, history_steps: int | None = None, batch_size: int = 16,
                      max_new_tokens: int = 96, seed: int | None = None,
                      done: Collection[tuple[str, int]] = (),
                      on_result: Callable[[list[StepCandidates]], None] | None = None) -> list[StepCandidates]:
    """Candidates for every step not in `done` ((trajectory id, step) pairs), in trajectory order.

    `batch_size` prompts (each sampled n times) go into one generate call. `on_result` receives each
    trajectory's new results as soon as all of its steps are sampled, so a caller can persist as it goes
    and a rerun with `done` skips them.
    """
    params = SamplingParams(n=n, temperature=temperature, max_new_tokens=max_new_tokens, stop=REPLY_STOP, seed=seed)
    jobs = [(t, i) for t in trajectories for i in range(len(t.steps)) if (t.id, i) not in done]
    remaining: dict[str, int] = {}
    for t, _ in jobs:
        remaining[t.id] = remaining.get(t.id, 0) + 1
    finished: dict[str, list[StepCandidates]] = {}
    results = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        prompts = [agent_prompt(backend, t.env, t.instruction, t.steps[:i], history_steps, max_new_tokens)
                   for t, i in chunk]
        for (t, i), completions in zip(chunk, backend.generate(prompts, params, adapter)):
            result = collect_candidates(t.id, i, t.env, t.steps[i].action, [c.text for c in completions])
            results.append(result)
            finished.setdefault(t.id, []).append(result)
            remaining[t.id] -= 1
            if remaining[t.id] == 0 and on_result:
                on_result(finished.pop(t.id))
    return results
