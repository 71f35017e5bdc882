"""Execution-guided action critique: what each candidate of an uncertain step leads to.

Every candidate (the expert action included) is executed after the expert prefix and the agent pi_k
plays on (temperature 1.0, through the rollout engine, at most `rollout_max_steps` agent steps after
the candidate). The frozen base model pi_base then judges, at temperature 0, whether the candidate
advanced, hindered or did not affect the task, and writes one reusable insight as the agent's own
foresight ("If I ..., ...").

Work is keyed by `CandidateKey` (task, expert prefix, normalised action): identical branch points of
different trajectories run once, and a rerun given the finished keys skips them.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from sand import prompts
from sand.envs.base import TaskSpec
from sand.evaluation import adapter_identity
from sand.models.backends import Backend, SamplingParams
from sand.rollout import EpisodeRequest, EpisodeResult, RolloutEngine
from sand.sand_loop.actions import normalize
from sand.sand_loop.sampling import StepCandidates
from sand.trajectory import Trajectory

VERDICTS = ("advanced", "hindered", "no effect")
REPLY_START = "Verdict:"  # the critic's reply is started for it: small models otherwise echo the prompt
# Words that name a verdict; "did not advance" is no effect, not advanced.
_VERDICT_WORDS = {
    "advanced": re.compile(r"(?<!not )(?<!n't )\badvanc", re.IGNORECASE),
    "hindered": re.compile(r"\bhinder", re.IGNORECASE),
    "no effect": re.compile(r"\bno (?:real )?(?:effect|impact)|\bnot (?:affect|advance|change|help)|"
                            r"n't (?:affect|advance|change|help)|\bneutral\b", re.IGNORECASE),
}
_VERDICT = re.compile(r"verdict\W*[:\-](.*?)(?:insight\W*:|\Z)", re.IGNORECASE | re.DOTALL)
_GOAL = re.compile(r"Your task is to:?\s*(.+)")


class CandidateKey(NamedTuple):
    task_id: str
    prefix_len: int
    prefix_digest: str  # the prefix's actions: two trajectories of one task may differ before step t
    action: str  # normalised candidate


@dataclass
class Rollout:
    task_id: str
    prefix_len: int
    prefix_digest: str
    action: str
    trajectory_id: str  # the (first) trajectory and step that asked for this branch
    step: int
    executed: str  # the command sent: the expert's own text for the expert candidate
    thoughts: list[str]  # from the candidate on: the candidate's step, then the agent's
    actions: list[str]  # "" where the agent's reply had no action (a format error)
    observations: list[str]
    reward: float  # the episode's final score
    done: bool  # the episode ended (goal, failure, the task's limit); False when the rollout cap stopped it
    agent: str  # the agent that rolled out: "base" or its adapter identity

    @property
    def key(self) -> CandidateKey:
        return CandidateKey(self.task_id, self.prefix_len, self.prefix_digest, self.action)


@dataclass
class Critique:
    task_id: str
    prefix_len: int
    prefix_digest: str
    action: str
    trajectory_id: str
    step: int
    verdict: str  # one of VERDICTS
    verdict_inferred: bool  # the critic named no verdict: inferred from rollout rewards
    text: str  # the critic's reply
    critic: str  # the critic model's id

    @property
    def key(self) -> CandidateKey:
        return CandidateKey(self.task_id, self.prefix_len, self.prefix_digest, self.action)


def candidate_key(trajectory: Trajectory, step: int, action: str) -> CandidateKey:
    prefix = "\n".join(s.action for s in trajectory.steps[:step])
    return CandidateKey(trajectory.task_id, step, hashlib.sha1(prefix.encode()).hexdigest()[:12],
                        normalize(action, trajectory.env))


def task_goal(instruction: str) -> str:
    match = _GOAL.search(instruction)
    return match.group(1).strip() if match else _clip(instruction, 300)


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def history_text(trajectory: Trajectory, step: int, last: int = 5) -> str:
    """The expert prefix before `step` as the critic and the synthesis writer read it: the start, then the
    `last` most recent steps with clipped observations (the full prefix would not fit a small model)."""
    lines = [f"At the start: {_clip(trajectory.instruction, 500)}"]
    if step > last:
        lines.append(f"({step - last} earlier steps omitted)")
    for s in trajectory.steps[max(0, step - last):step]:
        lines.append(f'I did "{s.action}". Result: {_clip(s.observation, 200)}')
    return "\n".join(lines)


def rollout_summary(rollout: Rollout, shown: int = 6) -> str:
    """What followed the candidate, compactly: the agent's next actions and their results."""
    rest = list(zip(rollout.actions[1:], rollout.observations[1:]))
    lines = [f'- "{a}": {_clip(o, 100)}' if a else "- (an unreadable reply, nothing happened)"
             for a, o in rest[:shown]]
    if len(rest) > shown:
        lines.append(f"- ... and {len(rest) - shown} more steps")
    ending = "The task was completed." if rollout.reward >= 1 else \
        ("The episode ended." if rollout.done else "The episode was still going.")
    return "\n".join(lines or ["- nothing (the episode ended)"]) + f"\n{ending}"


def critique_prompt(critic: Backend, trajectory: Trajectory, rollout: Rollout, history_steps: int = 5) -> str:
    text = prompts.load("critique").format(
        goal=task_goal(trajectory.instruction), history=history_text(trajectory, rollout.prefix_len, history_steps),
        action=rollout.action, first_observation=_clip(rollout.observations[0], 400),
        rollout=rollout_summary(rollout), score=round(100 * rollout.reward))
    return critic.render([{"role": "user", "content": text}]) + REPLY_START


def parse_verdict(text: str) -> str | None:
    """The verdict the critic named: between "Verdict:" and "Insight:" if it wrote them, else anywhere in
    its reply; None when it names none or several (e.g. it echoed the list of choices)."""
    match = _VERDICT.search(text)
    scope = match.group(1) if match else text
    named = [v for v, pattern in _VERDICT_WORDS.items() if pattern.search(scope)]
    return named[0] if len(named) == 1 else None


def infer_verdict(reward: float, others: list[float]) -> str:
    """A verdict from rewards alone: better or worse than the step's other candidates on average."""
    if not others:
        return "no effect"
    reference = sum(others) / len(others)
    return "advanced" if reward > reference else "hindered" if reward < reference else "no effect"


def _rollout_of(result: EpisodeResult, key: CandidateKey, trajectory_id: str, step: int, agent: str) -> Rollout:
    after = result.steps[key.prefix_len:]
    # The engine marks an episode done at the cap too; one that ends exactly at the cap counts as stopped.
    cap = result.request.max_agent_steps
    ended = result.done and (cap is None or len(after) < 1 + cap or result.reward >= 1)
    return Rollout(*key, trajectory_id=trajectory_id, step=step, executed=result.request.first_action,
                   thoughts=[s.thought for s in after], actions=[s.action for s in after],
                   observations=[s.observation for s in after], reward=result.reward, done=ended,
                   agent=agent)


def critique_candidates(engine: RolloutEngine, critic: Backend, trajectories: list[Trajectory],
                        candidates: list[StepCandidates], adapter: str | None = None,
                        rollout_max_steps: int | None = None, critic_id: str = "base",
                        critic_batch: int = 64, max_new_tokens: int = 128, history_steps: int = 5,
                        done: Mapping[CandidateKey, float] | None = None,
                        on_result: Callable[[list[Rollout], list[Critique]], None] | None = None,
                        ) -> tuple[list[Rollout], list[Critique]]:
    """Roll out and critique every candidate of every uncertain step whose key is not in `done`.

    `engine` runs the agent `adapter` (build it with temperature 1.0). `done` maps finished keys to their
    rollout reward (the rollouts table has both), because a verdict the critic leaves out is inferred
    from the rewards of all the step's candidates. A step is critiqued once all its rollouts have ended,
    `critic_batch` critiques per generate call; `on_result` receives each batch (rollouts, critiques).
    Returns the new rollouts and critiques.
    """
    rewards = dict(done or {})
    by_id = {t.id: t for t in trajectories}
    agent = adapter_identity(adapter)
    requests: dict[str, EpisodeRequest] = {}
    keys: dict[str, CandidateKey] = {}
    origin: dict[CandidateKey, tuple[Trajectory, int]] = {}  # the first step that asked for a key
    branches: dict[CandidateKey, list[list[CandidateKey]]] = {}  # key -> the candidate sets waiting for it
    for c in (c for c in candidates if c.uncertain):
        trajectory = by_id[c.trajectory_id]
        branch = [candidate_key(trajectory, c.step, a) for a in c.candidates]
        for key, action in zip(branch, [c.expert_action, *c.alternatives]):  # the expert's own exact text
            branches.setdefault(key, []).append(branch)
            if key in rewards or key in origin:
                continue
            origin[key] = (trajectory, c.step)
            name = "\t".join(map(str, key))
            keys[name] = key
            requests[name] = EpisodeRequest(
                TaskSpec(trajectory.env, trajectory.task, trajectory.task_id, trajectory.split), key=name,
                prefix=tuple(trajectory.steps[:c.step]), first_action=action,
                max_agent_steps=rollout_max_steps)
    # Only the keys run here need a critique; `done` keys have theirs.
    ready: list[tuple[Rollout, list[float]]] = []
    rollouts: dict[CandidateKey, Rollout] = {}
    queued: set[CandidateKey] = set()
    new_rollouts, new_critiques = [], []

    def flush() -> None:
        prompts_ = [critique_prompt(critic, origin[r.key][0], r, history_steps) for r, _ in ready]
        replies = critic.generate(prompts_, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens))
        batch = []
        for (rollout, others), [reply] in zip(ready, replies):
            text = REPLY_START + reply.text
            verdict = parse_verdict(text)
            batch.append(Critique(*rollout.key, trajectory_id=rollout.trajectory_id, step=rollout.step,
                                  verdict=verdict or infer_verdict(rollout.reward, others),
                                  verdict_inferred=verdict is None, text=text.strip(), critic=critic_id))
        new_rollouts.extend(r for r, _ in ready)
        new_critiques.extend(batch)
        if on_result:
            on_result([r for r, _ in ready], batch)
        ready.clear()

    for result in engine.run(requests.values(), adapter):
        key = keys[result.request.key]
        trajectory, step = origin[key]
        rollouts[key] = _rollout_of(result, key, trajectory.id, step, agent)
        rewards[key] = result.reward
        for branch in branches[key]:
            # The last rollout of a candidate set to end makes every candidate of it run here critiquable.
            if all(k in rewards for k in branch):
                for k in [k for k in branch if k in rollouts and k not in queued]:
                    queued.add(k)
                    ready.append((rollouts[k], [rewards[o] for o in branch if o != k]))
        if len(ready) >= critic_batch:
            flush()
    if ready:
        flush()
    return new_rollouts, new_critiques
