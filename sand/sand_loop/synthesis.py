"""Deliberation thought synthesis and the deliberation dataset D_k.

For each uncertain step the frozen base model pi_base (temperature 0) receives every candidate with
its critique and writes one thought that weighs them and concludes with the expert action, which is
fixed as the answer. The thought replaces the step's thought; actions and observations stay. Confident
steps keep their thought: the mix teaches the agent when to deliberate.

Marker: every synthesised thought, fallbacks included, opens with DELIBERATION_PREFIX (the writer's reply
is forced to start with it) and names candidate actions in double quotes ("go to desk 1"; the writer is
told to, fallbacks always do). So
`thought.startswith(DELIBERATION_PREFIX)` recognises a deliberation exactly (its "let me weigh" and
"options:" are also markers of `sand.evaluation.is_deliberation`).

Ablations: without `candidates` (no self-consistency sampling) every step
deliberates over alternatives the writer invents itself; without `critiques` (no execution-guided
critique) the thought weighs the sampled candidates alone.

Expert switch (off by default; the paper leaves its mechanics open): at the first uncertain step of a
trajectory where an alternative's rollout scored higher than the expert action's rollout, that
alternative becomes the answer, and the rest of the trajectory is replaced by that rollout (the agent's
own steps after the candidate, without its unreadable replies, which did not touch the environment);
the trajectory's reward becomes the rollout's. Later uncertain steps of that trajectory are dropped.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from sand import prompts
from sand.errors import SandError
from sand.models.backends import Backend, SamplingParams
from sand.sand_loop.actions import mentions, normalize
from sand.sand_loop.critique import (
    Critique,
    Rollout,
    candidate_key,
    history_text,
    task_goal,
)
from sand.sand_loop.sampling import StepCandidates
from sand.trajectory import Step, Trajectory

DELIBERATION_PREFIX = "Let me weigh my options:"
DATASET_SUFFIX = "#sand"  # D_k trajectory id = original id + suffix (not repeated over iterations)
_STOP = ("\nAction:", "\nObservation:")
_SENTENCE_END = re.compile(r"[.!?][\"”']?(?=\s|$)")
_QUOTED = re.compile(r"\"([^\"\n]{1,80})\"")
_INSIGHT = re.compile(r"\bIf I [a-z][^\n]*")  # "If I open the fridge, ...": a foresight, not a stray "If I,"
_FORESIGHT = {"advanced": "it would move the task forward", "hindered": "it would set the task back",
              "no effect": "it would not change much"}


@dataclass
class Deliberation:
    trajectory_id: str
    step: int
    thought: str
    answer: str  # the action the thought concludes with (the expert's, or the switched-to candidate)
    candidates: list[str]  # the normalised actions it weighs (no_sampling: those the writer named)
    fallback: bool  # the writer failed validation twice: the thought is templated from the critiques
    retried: bool
    mode: str  # "sand", "no_critique" or "no_sampling"


@dataclass
class Synthesis:
    deliberations: list[Deliberation]
    dataset: list[Trajectory]  # D_k
    switched: list[str] = field(default_factory=list)  # ids of trajectories changed by the expert switch

    @property
    def fallbacks(self) -> int:
        return sum(d.fallback for d in self.deliberations)

    @property
    def retries(self) -> int:
        return sum(d.retried for d in self.deliberations)


@dataclass
class _Job:
    trajectory: Trajectory
    step: int
    answer: str
    options: list[tuple[str, Critique | None]]  # (normalised candidate, its critique), prompt order


def dataset_id(trajectory_id: str) -> str:
    return trajectory_id.removesuffix(DATASET_SUFFIX) + DATASET_SUFFIX


def conclude(thought: str, answer: str, env: str) -> str | None:
    """The thought cut after its last sentence that names `answer` (what follows would be a second
    opinion); None when no sentence names it."""
    start, cut = 0, None
    for end in [m.end() for m in _SENTENCE_END.finditer(thought)] + [len(thought)]:
        if mentions(thought[start:end], answer, env):
            cut = end
        start = end
    return thought[:cut].rstrip() if cut is not None else None


def quoted_actions(thought: str, env: str) -> list[str]:
    """Distinct normalised actions the thought names in double quotes (spans of at most 12 words)."""
    found = []
    for span in _QUOTED.findall(thought):
        action = normalize(span, env)
        if action and len(action.split()) <= 12 and action not in found:
            found.append(action)
    return found


def validate(thought: str, answer: str, candidates: list[str] | None, env: str) -> str | None:
    """The valid part of a synthesised thought, or None: it must conclude with `answer` (its final sentence
    names it) and name at least two actions: two of `candidates`, or (None: the writer invented the
    alternatives) two distinct quoted actions."""
    cut = conclude(thought, answer, env)
    if cut is None:
        return None
    named = sum(mentions(cut, c, env) for c in candidates) if candidates is not None else \
        len(quoted_actions(cut, env))
    return cut if named >= 2 else None


def _insight(critique: Critique | None) -> str:
    match = _INSIGHT.search(critique.text) if critique else None
    return match.group(0).strip().rstrip(".") + "." if match else ""


def _foresight(critique: Critique) -> str:
    return f"{_FORESIGHT[critique.verdict]}. {_insight(critique)}".rstrip()


def fallback_thought(job: _Job, invented: list[str]) -> str:
    """A deliberation templated from what is known when the writer fails twice: the candidates with their
    critiques' verdicts and insights, or (no_sampling) the alternatives the writer did name, if any."""
    answer = normalize(job.answer, job.trajectory.env)
    critiques = {a: c for a, c in job.options if c is not None}
    others = [a for a in ([a for a, _ in job.options] or invented) if a != answer][:4]
    parts = [DELIBERATION_PREFIX]
    if critiques:
        parts += [f'If I "{a}", {_foresight(critiques[a])}' if a in critiques else f'I could also "{a}".'
                  for a in others]
        parts.append(f'Comparing them, "{answer}" is the best next step. {_insight(critiques.get(answer))}'.rstrip())
    else:
        if others:
            parts.append("I could " + " or ".join(f'"{a}"' for a in others) + ".")
        parts.append(f'"{answer}" fits the task and what I see best.')
    parts.append(f'So I will "{answer}".')
    return " ".join(parts)


def _order(trajectory_id: str, step: int, actions: list[str]) -> list[str]:
    """A fixed pseudo-random order, so the answer is not always listed first."""
    return sorted(actions, key=lambda a: hashlib.sha1(f"{trajectory_id}:{step}:{a}".encode()).hexdigest())


def _prompt(writer: Backend, job: _Job, mode: str, history_steps: int, strict: bool) -> str:
    t = job.trajectory
    options = "\n".join(f'- "{a}": {_foresight(c)}' if c else f'- "{a}"' for a, c in job.options)
    template = {"sand": "synthesis", "no_critique": "synthesis_no_critique", "no_sampling": "synthesis_no_sampling"}
    text = prompts.load(template[mode]).format(goal=task_goal(t.instruction), history=history_text(t, job.step,
                                               history_steps), options=options, answer=job.answer)
    if strict:
        text += "\n\n" + prompts.load("synthesis_retry").format(answer=job.answer)
    # The reply is forced to open with the marker: the writer continues from it.
    return writer.render([{"role": "user", "content": text}]) + DELIBERATION_PREFIX


def _switch_points(by_id: dict[str, Trajectory], uncertain: list[StepCandidates],
                   rollouts: list[Rollout]) -> dict[str, tuple[int, Rollout]]:
    """Trajectory id -> (step, rollout) of its first step where an alternative beat the expert action."""
    by_key = {r.key: r for r in rollouts}
    switches: dict[str, tuple[int, Rollout]] = {}
    for c in sorted(uncertain, key=lambda c: c.step):
        t = by_id[c.trajectory_id]
        expert = by_key.get(candidate_key(t, c.step, c.expert_action))
        others = [by_key[k] for k in (candidate_key(t, c.step, a) for a in c.alternatives) if k in by_key]
        best = max(others, key=lambda r: r.reward, default=None)
        if t.id not in switches and expert and best and best.reward > expert.reward:
            switches[t.id] = (c.step, best)
    return switches


def _write(writer: Backend, jobs: list[_Job], todo, mode: str, params: SamplingParams, batch_size: int,
           history_steps: int, strict: bool) -> dict[int, tuple[str | None, str]]:
    """Job index -> (the valid thought or None, the writer's reply), `batch_size` prompts per generate call."""
    todo, out = list(todo), {}
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        replies = writer.generate([_prompt(writer, jobs[i], mode, history_steps, strict) for i in chunk], params)
        for i, [reply] in zip(chunk, replies):
            job, text = jobs[i], f"{DELIBERATION_PREFIX} {reply.text.strip()}"
            names = [a for a, _ in job.options] if mode != "no_sampling" else None
            out[i] = validate(text, job.answer, names, job.trajectory.env), text
    return out


def synthesize(writer: Backend, trajectories: list[Trajectory], candidates: list[StepCandidates] | None,
               critiques: list[Critique] | None = None, rollouts: list[Rollout] | None = None,
               expert_switch: bool = False, batch_size: int = 64, max_new_tokens: int = 192,
               history_steps: int = 5) -> Synthesis:
    """Deliberation thoughts for the uncertain steps and the dataset D_k.

    `writer` is pi_base (base weights, temperature 0). `candidates=None`: ablation without
    self-consistency sampling; `critiques=None`: ablation without execution-guided critique.
    `expert_switch` needs the rollouts.
    """
    mode = "no_sampling" if candidates is None else "sand" if critiques is not None else "no_critique"
    if expert_switch and rollouts is None:
        raise SandError("the expert switch compares rollout rewards: pass the rollouts")
    by_id = {t.id: t for t in trajectories}
    uncertain = [c for c in candidates or [] if c.uncertain]
    switches = _switch_points(by_id, uncertain, rollouts) if expert_switch else {}
    if mode == "no_sampling":
        jobs = [_Job(t, i, s.action, []) for t in trajectories for i, s in enumerate(t.steps)]
    else:
        by_key = {c.key: c for c in critiques or []}
        jobs = []
        for c in uncertain:
            t = by_id[c.trajectory_id]
            switch = switches.get(t.id)
            if switch and c.step > switch[0]:
                continue  # replaced by the switched-to rollout
            answer = switch[1].executed if switch and c.step == switch[0] else c.expert_action
            jobs.append(_Job(t, c.step, answer, [(a, by_key.get(candidate_key(t, c.step, a)))
                                                for a in _order(t.id, c.step, c.candidates)]))
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop=_STOP)
    first = _write(writer, jobs, range(len(jobs)), mode, params, batch_size, history_steps, strict=False)
    retry = _write(writer, jobs, [i for i, (valid, _) in first.items() if valid is None], mode, params, batch_size,
                   history_steps, strict=True)
    deliberations = []
    for i, job in enumerate(jobs):
        env, answer = job.trajectory.env, normalize(job.answer, job.trajectory.env)
        valid, reply = retry.get(i, first[i])
        thought = valid or fallback_thought(job, quoted_actions(reply, env))
        weighed = [a for a, _ in job.options] or [answer] + [a for a in quoted_actions(thought, env) if a != answer]
        deliberations.append(Deliberation(job.trajectory.id, job.step, thought, job.answer, weighed,
                                          fallback=valid is None, retried=i in retry, mode=mode))
    return Synthesis(deliberations, build_dataset(trajectories, deliberations, switches), sorted(switches))


def build_dataset(trajectories: list[Trajectory], deliberations: list[Deliberation],
                  switches: dict[str, tuple[int, Rollout]] | None = None) -> list[Trajectory]:
    """D_k: each trajectory with its deliberating steps' thoughts replaced (and, with the expert switch,
    its tail replaced by the switched-to rollout); all other thoughts, actions and observations unchanged."""
    by_step = {(d.trajectory_id, d.step): d.thought for d in deliberations}
    dataset = []
    for t in trajectories:
        steps, reward = list(t.steps), t.reward
        if switches and t.id in switches:
            step, rollout = switches[t.id]
            steps = steps[:step] + [Step(th, a, o) for th, a, o in
                                    zip(rollout.thoughts, rollout.actions, rollout.observations) if a]
            reward = rollout.reward
        steps = [Step(by_step.get((t.id, i), s.thought), s.action, s.observation) for i, s in enumerate(steps)]
        dataset.append(Trajectory(id=dataset_id(t.id), env=t.env, task=t.task, task_id=t.task_id, split=t.split,
                                  source="sand", instruction=t.instruction, steps=steps, reward=reward))
    return dataset
