"""Execution-guided action critique: what each candidate of an uncertain step leads to.

Every candidate (the expert action included) is executed after the expert prefix and the agent pi_k
plays on (temperature 1.0, through the rollout engine, at most `rollout_max_steps` agent steps after
the candidate). What execution showed is the candidate's evidence: whether the environment accepted it,
its observation, the score before it, right after it and at the end of the rollout, whether the task
was won, and the steps taken. `evidence_verdict` turns the evidence into a verdict by a fixed rule.

The critic (pi_base, or the experiment's `sand.critic_model`) then sees that evidence compactly, never
the rollout's transcript, after a few examples taken from this run's own rollouts (each with its evidence
verdict and an insight written from its evidence). It chooses its verdict among the three words under
constraint (`Backend.choose`), then writes one reusable insight as the agent's own foresight, forced to
start with "If I" and cut at the end of the line. An insight that copies the prompt, says nothing, is about
another action, or claims an outcome the evidence contradicts (the score rose after a candidate the evidence
says hindered, "nothing happens" after one that advanced) is replaced by one written from the evidence
(`evidence_insight`), so no critique text is an echo or untrue to what execution showed.

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
from sand.sand_loop.actions import mentions, normalize
from sand.sand_loop.sampling import StepCandidates
from sand.sand_loop.texts import claims_gain, claims_loss, echoes, repeats_sentence, sentences, words
from sand.trajectory import Trajectory

VERDICTS = ("advanced", "hindered", "no effect")
VERDICT_CUE = "Verdict:"  # the critic's reply is started for it; the verdict is chosen right after
INSIGHT_CUE = "Insight: If I"  # the insight is forced to start as the agent's own foresight
EXAMPLES = 3  # examples from this run's rollouts before the critiqued candidate (at most one per verdict)
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
    reward: float  # the episode's score at the end of the rollout
    done: bool  # the episode ended (goal, failure, the task's limit); False when the rollout cap stopped it
    agent: str  # the agent that rolled out: "base" or its adapter identity
    valid: bool  # the environment accepted the candidate
    score_before: float  # the episode's score after the expert prefix
    score_after: float  # right after the candidate
    won: bool  # the task was completed within the rollout
    evidence: str  # the evidence verdict (evidence_verdict), one of VERDICTS

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
    verdict: str  # the critic's, one of VERDICTS
    verdict_inferred: bool  # the critic's backend could not choose a verdict: the evidence verdict stands in
    text: str  # "Verdict: ...\nInsight: If I ..."
    critic: str  # the critic model's id
    insight_written: bool  # the insight is the critic's (False: it echoed the prompt; written from the evidence)
    # The evidence the critic saw (as in the candidate's rollout row).
    valid: bool
    observation: str
    score_before: float
    score_after: float
    score_end: float
    won: bool
    steps: int  # steps taken in the rollout, the candidate's included
    evidence: str  # the evidence verdict

    @property
    def key(self) -> CandidateKey:
        return CandidateKey(self.task_id, self.prefix_len, self.prefix_digest, self.action)

    @property
    def agrees(self) -> bool:
        """The critic's verdict is the evidence verdict."""
        return self.verdict == self.evidence


def evidence_verdict(rollout: Rollout, expert: Rollout | None) -> str:
    """The verdict execution shows, by this rule, first match wins:

    1. hindered: the environment did not accept the candidate (nothing the agent did afterwards is its doing);
    2. advanced: the task was won, or the score rose (at the end of the rollout above the score before it);
    3. hindered: the score fell, or the episode ended unwon in fewer steps than the expert action's rollout
       (or while the expert's was still going);
    4. no effect: otherwise.
    `expert` is the rollout of the step's expert action (None or `rollout` itself for the expert's own).
    """
    if not rollout.valid:
        return "hindered"
    if rollout.won or rollout.reward > rollout.score_before:
        return "advanced"
    if min(rollout.score_after, rollout.reward) < rollout.score_before:
        return "hindered"
    if expert is not None and expert is not rollout and rollout.done and not rollout.won and \
            (not expert.done or len(rollout.actions) < len(expert.actions)):
        return "hindered"
    return "no effect"


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
    """The expert prefix before `step` as the synthesis writer reads it: the start, then the
    `last` most recent steps with clipped observations (the full prefix would not fit a small model)."""
    lines = [f"At the start: {_clip(trajectory.instruction, 500)}"]
    if step > last:
        lines.append(f"({step - last} earlier steps omitted)")
    for s in trajectory.steps[max(0, step - last):step]:
        lines.append(f'I did "{s.action}". Result: {_clip(s.observation, 200)}')
    return "\n".join(lines)


def evidence_text(goal: str, rollout: Rollout) -> str:
    """The evidence of one candidate as the critic reads it: a few lines, no transcript."""
    before, after, end = (round(100 * x) for x in (rollout.score_before, rollout.score_after, rollout.reward))
    later = len(rollout.actions) - 1
    ending = (f"the task was completed {later} steps after the action" if rollout.won else
              f"the episode ended in failure {later} steps after the action" if rollout.done else
              f"the task was not completed in the {later} steps after the action")
    return (f"Task: {goal}\nAction: {rollout.action}\nAccepted: {'yes' if rollout.valid else 'no'}\n"
            f"Result: {_clip(observation(rollout), 200)}\n"
            f"Score: {before} before, {after} right after, {end} at the end\nThen: {ending}")


def observation(rollout: Rollout) -> str:
    """The environment's answer to the candidate ("" when the expert prefix ended the episode before it)."""
    return rollout.observations[0] if rollout.observations else ""


def evidence_insight(rollout: Rollout) -> str:
    """An insight written from the evidence alone: what the candidate led to, as the agent's own foresight."""
    if not rollout.valid:
        outcome = "nothing happens and I lose a step"
    elif rollout.won:
        outcome = "I can go on to complete the task"
    elif rollout.score_after > rollout.score_before:
        outcome = "the score goes up right away"
    elif rollout.reward > rollout.score_before:
        outcome = "the score goes up later on"
    elif min(rollout.score_after, rollout.reward) < rollout.score_before:
        outcome = "the score goes down"
    elif rollout.evidence == "hindered":
        outcome = "the episode soon ends in failure"
    else:
        outcome = "the task does not progress"
    return f"If I {rollout.action} here, {outcome}."


def critique_messages(goal: str, rollout: Rollout, examples: list[tuple[str, Rollout]]) -> list[dict]:
    """The critic's conversation: the instruction, each example (goal, rollout) answered with its evidence
    verdict and evidence insight, then the candidate's evidence."""
    messages = [{"role": "system", "content": prompts.load("critique").strip()}]
    for example_goal, example in examples:
        messages += [{"role": "user", "content": evidence_text(example_goal, example)},
                     {"role": "assistant", "content": f"{VERDICT_CUE} {example.evidence}\n"
                                                      f"Insight: {evidence_insight(example)}"}]
    return messages + [{"role": "user", "content": evidence_text(goal, rollout)}]


def critique_prompt(critic: Backend, goal: str, rollout: Rollout, examples: list[tuple[str, Rollout]]) -> str:
    """The rendered conversation, the critic's reply started at its verdict."""
    return critic.render(critique_messages(goal, rollout, examples)) + VERDICT_CUE


def _digest(rollout: Rollout) -> str:
    return hashlib.sha1("\t".join(map(str, rollout.key)).encode()).hexdigest()


def pick_examples(pool: list[Rollout], rollout: Rollout, n: int = EXAMPLES) -> list[Rollout]:
    """At most `n` examples for critiquing `rollout` from `pool` (rollouts with their evidence verdicts), one per
    evidence verdict, from other branch points and other actions (so none is an answer the critic could copy),
    chosen and ordered pseudo-randomly but fixed."""
    chosen: dict[str, Rollout] = {}
    for r in sorted(pool, key=_digest):
        if r.evidence not in chosen and r.action != rollout.action and r.key[:3] != rollout.key[:3]:
            chosen[r.evidence] = r
            if len(chosen) == len(VERDICTS):
                break
    return sorted(chosen.values(), key=_digest)[:n]


def contradicts(insight: str, rollout: Rollout) -> bool:
    """Whether the insight claims an outcome the candidate's evidence verdict rules out: progress after a
    candidate that hindered or had no effect, no progress after one that advanced. (The action's own words
    are left out: "finish" in an action's name is no claim.)"""
    claim = re.sub(re.escape(rollout.action), " ", insight, flags=re.IGNORECASE) if rollout.action else insight
    if rollout.evidence == "advanced":
        return claims_loss(claim)
    return claims_gain(claim)


def written_insight(reply: str, prompt: str, rollout: Rollout, env: str | None = None) -> str | None:
    """The critic's insight (its reply after the forced "If I"): the first sentence, or None when that is
    unfinished, too short to say anything, repeats itself, copies the prompt (naming the candidate is no copy),
    is about another action than the candidate, or contradicts the candidate's evidence."""
    found = sentences("If I" + reply)
    insight = found[0] if found else ""
    if not insight.endswith((".", "!")) or len(words(insight)) < 5 or repeats_sentence(reply) or \
            echoes(insight, prompt, (rollout.action,)) or not mentions(insight, rollout.action, env) or \
            contradicts(insight, rollout):
        return None
    return insight


def _rollout_of(result: EpisodeResult, key: CandidateKey, trajectory_id: str, step: int, agent: str) -> Rollout:
    """The rollout part of an episode (from the candidate on), its evidence verdict still to be set."""
    after = result.steps[key.prefix_len:]
    # The engine marks an episode done at the cap too; one that ends exactly at the cap counts as stopped.
    cap = result.request.max_agent_steps
    won = result.reward >= 1.0
    ended = result.done and (cap is None or len(after) < 1 + cap or won)
    scores = result.scores[key.prefix_len:]  # before the candidate, then after each step from it on
    return Rollout(*key, trajectory_id=trajectory_id, step=step, executed=result.request.first_action,
                   thoughts=[s.thought for s in after], actions=[s.action for s in after],
                   observations=[s.observation for s in after], reward=result.reward, done=ended,
                   agent=agent, valid=len(result.valid) > key.prefix_len and result.valid[key.prefix_len],
                   score_before=scores[0], score_after=scores[1] if len(scores) > 1 else scores[0], won=won,
                   evidence="")


def critique_candidates(engine: RolloutEngine, critic: Backend, trajectories: list[Trajectory],
                        candidates: list[StepCandidates], adapter: str | None = None,
                        rollout_max_steps: int | None = None, critic_id: str = "base",
                        critic_batch: int = 64, max_new_tokens: int = 48,
                        done: Mapping[CandidateKey, Rollout] | None = None,
                        on_result: Callable[[list[Rollout], list[Critique]], None] | None = None,
                        ) -> tuple[list[Rollout], list[Critique]]:
    """Roll out and critique every candidate of every uncertain step whose key is not in `done`.

    `engine` runs the agent `adapter` (build it with temperature 1.0). `done` holds the finished rollouts (those
    with a critique) by key: a candidate's evidence verdict compares it with its step's expert rollout, and they
    are examples for the critic. A step is critiqued once all its rollouts have ended, `critic_batch` critiques
    per batch of calls; `max_new_tokens` bounds an insight; `on_result` receives each batch (rollouts,
    critiques). Returns the new rollouts and critiques.
    """
    finished: dict[CandidateKey, Rollout] = dict(done or {})
    by_id = {t.id: t for t in trajectories}
    agent = adapter_identity(adapter)
    requests: dict[str, EpisodeRequest] = {}
    keys: dict[str, CandidateKey] = {}
    origin: dict[CandidateKey, tuple[Trajectory, int]] = {}  # the first step that asked for a key
    branches: dict[CandidateKey, list[list[CandidateKey]]] = {}  # key -> the candidate sets waiting for it
    for c in (c for c in candidates if c.uncertain):
        trajectory = by_id[c.trajectory_id]
        branch = [candidate_key(trajectory, c.step, a) for a in c.candidates]  # the expert's first
        for key, action in zip(branch, [c.expert_action, *c.alternatives]):  # the expert's own exact text
            branches.setdefault(key, []).append(branch)
            if key in finished or key in origin:
                continue
            origin[key] = (trajectory, c.step)
            name = "\t".join(map(str, key))
            keys[name] = key
            requests[name] = EpisodeRequest(
                TaskSpec(trajectory.env, trajectory.task, trajectory.task_id, trajectory.split), key=name,
                prefix=tuple(trajectory.steps[:c.step]), first_action=action,
                max_agent_steps=rollout_max_steps)
    # Only the keys run here need a critique; `done` keys have theirs.
    ready: list[Rollout] = []
    rollouts: dict[CandidateKey, Rollout] = {}
    judged = [r for r in finished.values() if r.trajectory_id in by_id]  # rollouts with evidence: examples
    new_rollouts, new_critiques = [], []

    def goal(rollout: Rollout) -> str:
        return task_goal(by_id[rollout.trajectory_id].instruction)

    def flush() -> None:
        judged.sort(key=_digest)  # (then nearly sorted for each pick)
        prompts_ = [critique_prompt(critic, goal(r), r, [(goal(e), e) for e in pick_examples(judged, r)])
                    for r in ready]
        chosen = [c.strip() if c is not None else None for c in critic.choose(prompts_, [f" {v}" for v in VERDICTS])]
        verdicts = [c or r.evidence for c, r in zip(chosen, ready)]
        replies = critic.generate([f"{p} {v}\n{INSIGHT_CUE}" for p, v in zip(prompts_, verdicts)],
                                  SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop=("\n",)))
        batch = []
        for rollout, prompt, verdict, c, [reply] in zip(ready, prompts_, verdicts, chosen, replies):
            insight = written_insight(reply.text, prompt, rollout, by_id[rollout.trajectory_id].env)
            batch.append(Critique(
                *rollout.key, trajectory_id=rollout.trajectory_id, step=rollout.step, verdict=verdict,
                verdict_inferred=c is None, text=f"{VERDICT_CUE} {verdict}\nInsight: "
                                                 f"{insight or evidence_insight(rollout)}",
                critic=critic_id, insight_written=insight is not None, valid=rollout.valid,
                observation=observation(rollout), score_before=rollout.score_before,
                score_after=rollout.score_after, score_end=rollout.reward, won=rollout.won,
                steps=len(rollout.actions), evidence=rollout.evidence))
        new_rollouts.extend(ready)
        new_critiques.extend(batch)
        if on_result:
            on_result(list(ready), batch)
        ready.clear()

    for result in engine.run(requests.values(), adapter):
        key = keys[result.request.key]
        trajectory, step = origin[key]
        rollouts[key] = finished[key] = _rollout_of(result, key, trajectory.id, step, agent)
        for branch in branches[key]:
            # The last rollout of a candidate set to end makes every candidate of it run here critiquable.
            if all(k in finished for k in branch):
                for k in [k for k in branch if k in rollouts and not rollouts[k].evidence]:
                    rollouts[k].evidence = evidence_verdict(rollouts[k], finished[branch[0]])
                    ready.append(rollouts[k])
                    judged.append(rollouts[k])
        if len(ready) >= critic_batch:
            flush()
    if ready:
        flush()
    return new_rollouts, new_critiques
