"""Deliberation thought synthesis and the deliberation dataset D_k.

For each uncertain step the frozen base model pi_base (temperature 0) receives every candidate with
its critique and writes one thought that weighs them and concludes with the expert action, which is
fixed as the answer. The thought replaces the step's thought; actions and observations stay. Confident
steps keep their thought: the mix teaches the agent when to deliberate.

Marker: every synthesised thought, fallbacks included, opens with DELIBERATION_PREFIX (the writer's reply
is forced to start with it) and names candidate actions in double quotes ("go to desk 1"). So
`thought.startswith(DELIBERATION_PREFIX)` recognises a deliberation exactly (its "let me weigh" and
"options:" are also markers of `sand.evaluation.is_deliberation`).

Validation: the writer's thought is kept only if it concludes at the answer (what follows is cut; its last
sentence names the answer after any other quoted action), repeats no sentence and no clause that quotes an
action ('I will "look" and I will "look"'), names at least two distinct candidates in double quotes, and calls
no candidate good that its evidence says hindered nor bad that its evidence says advanced (a sentence naming
that candidate alone, with a praise or blame word not negated), and fits with its action in the agent's reply
budget. Otherwise the writer tries once more under stricter instructions, and then the thought is written from
the evidence: each candidate in quotes with what executing it showed, then the answer, shortened until it fits.
So every stored deliberation passes the validator, and the agent can say every one of them within its budget
(a thought it cannot finish teaches it replies cut off before their action).

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
from collections.abc import Callable
from dataclasses import dataclass, field

from sand import prompts
from sand.errors import SandError
from sand.models.backends import Backend, SamplingParams
from sand.react import assistant_turn
from sand.sand_loop.actions import mentions, normalize
from sand.sand_loop.critique import (
    VERDICTS,
    Critique,
    Rollout,
    candidate_key,
    history_text,
    task_goal,
)
from sand.sand_loop.deliberation import Deliberation
from sand.sand_loop.sampling import StepCandidates
from sand.sand_loop.texts import blames, praises, repeats_sentence, sentences, words
from sand.trajectory import Step, Trajectory

DELIBERATION_PREFIX = "Let me weigh my options:"
DATASET_SUFFIX = "#sand"  # D_k trajectory id = original id + suffix (not repeated over iterations)
_STOP = ("\nAction:", "\nObservation:")
_SENTENCE_END = re.compile(r"[.!?][\"”']?(?=\s|$)")
_QUOTED = re.compile(r"\"([^\"\n]{1,300})\"")  # actions and quoted observations (pairs must stay aligned)
_CLAUSE_BREAK = re.compile(r"[,;:]|\b(?:and|or|but|then)\b", re.IGNORECASE)
_RANK = {"advanced": 2, "no effect": 1, "hindered": 0}
_Fits = Callable[[str, str], bool]  # (thought, answer) -> whether the agent's reply holds them
assert set(_RANK) == set(VERDICTS)


@dataclass
class Synthesis:
    deliberations: list[Deliberation]
    dataset: list[Trajectory]  # D_k
    switched: list[str] = field(default_factory=list)  # ids of trajectories changed by the expert switch
    unfit: list[tuple[str, int]] = field(default_factory=list)  # (id, step): no deliberation fits the reply budget
    alike: list[tuple[str, int]] = field(default_factory=list)  # (id, step): not deliberated, candidates alike

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

    @property
    def names(self) -> list[str] | None:
        """The candidates a thought may name (None: the writer invents them)."""
        return [a for a, _ in self.options] or None

    @property
    def evidence(self) -> dict[str, str]:
        return {a: c.evidence for a, c in self.options if c is not None}

    @property
    def separated(self) -> bool:
        """Whether executing the candidates told them apart: their evidence verdicts differ (evidence missing for
        some candidate does not show that they are alike)."""
        evidence = self.evidence
        return len(evidence) < len(self.options) or len(set(evidence.values())) > 1


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


def ends_at(thought: str, answer: str, env: str) -> bool:
    """Whether the thought's last sentence names `answer` after any other quoted action (a run-on such as
    'I will "X" and I will "Y" and I' names the answer X first, then goes on)."""
    said = sentences(thought)
    spans = _QUOTED.findall(said[-1]) if said else []
    return bool(said) and mentions(said[-1], answer, env) and (
        not spans or normalize(spans[-1], env) == normalize(answer, env))


def _clauses(sentence: str) -> list[str]:
    """The sentence split at commas, colons and conjunctions outside double quotes."""
    masked = _QUOTED.sub(lambda m: '"' + "_" * len(m.group(1)) + '"', sentence)
    bounds = [0, *(i for m in _CLAUSE_BREAK.finditer(masked) for i in m.span()), len(sentence)]
    return [sentence[a:b] for a, b in zip(bounds[::2], bounds[1::2])]


def repeats_itself(thought: str) -> bool:
    """A sentence said twice, the opening marker aside ('Let me weigh my options: I will "X".' then 'I will
    "X".'), or a clause quoting an action said twice ('I will "look" and I will "look"')."""
    body = thought.removeprefix(DELIBERATION_PREFIX)
    quoting = [tuple(words(c)) for s in sentences(body) for c in _clauses(s) if '"' in c]
    return repeats_sentence(body) or len(set(quoting)) < len(quoting)


def quoted_actions(thought: str, env: str) -> list[str]:
    """Distinct normalised actions the thought names in double quotes (spans of at most 12 words)."""
    found = []
    for span in _QUOTED.findall(thought):
        action = normalize(span, env)
        if action and len(action.split()) <= 12 and action not in found:
            found.append(action)
    return found


def named_candidates(thought: str, candidates: list[str] | None, env: str) -> list[str]:
    """The distinct candidates the thought names in double quotes (None: any quoted action counts)."""
    quoted = quoted_actions(thought, env)
    return quoted if candidates is None else [a for a in quoted if a in candidates]


def check(thought: str, answer: str, candidates: list[str] | None, env: str,
          evidence: dict[str, str] | None = None) -> tuple[str | None, str | None]:
    """(the valid part of a synthesised thought, None), or (None, why it is rejected).

    `candidates`: the normalised actions it weighs (None: the writer invented them); `evidence`: candidate ->
    its evidence verdict. The rules are the module docstring's."""
    cut = conclude(thought, answer, env)
    if cut is None or not ends_at(cut, answer, env):
        return None, "does not conclude at the answer"
    if repeats_itself(cut):
        return None, "repeats itself"
    if len(named_candidates(cut, candidates, env)) < 2:
        return None, "names fewer than two candidates in quotes"
    for sentence in sentences(cut):
        named = named_candidates(sentence, candidates, env)
        verdict = (evidence or {}).get(named[0]) if len(named) == 1 else None
        said = _QUOTED.sub('""', sentence)  # what the sentence says itself: quoted actions and observations
        if verdict == "hindered" and praises(said):  # ("correct action", "list of possible objects") judge nothing
            return None, f'calls "{named[0]}" good, but its evidence says it hindered'
        if verdict == "advanced" and blames(said):
            return None, f'calls "{named[0]}" bad, but its evidence says it advanced'
    return cut, None


def validate(thought: str, answer: str, candidates: list[str] | None, env: str,
             evidence: dict[str, str] | None = None) -> str | None:
    """The valid part of a synthesised thought, or None (`check` says why)."""
    return check(thought, answer, candidates, env, evidence)[0]


def _quote(observation: str, limit: int = 100) -> str:
    """An observation fit to sit inside double quotes in one sentence."""
    text = " ".join(observation.replace('"', "'").split())
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " (...)"


def evidence_sentence(action: str, critique: Critique, quote: int = 100) -> str:
    """What executing `action` showed, as the agent's foresight: one true sentence naming it in quotes, quoting
    at most `quote` characters of the observation (0: none)."""
    seen, later = _quote(critique.observation, quote), critique.steps - 1
    within = f" within {later} more step{'s' if later > 1 else ''}"
    before, end = round(100 * critique.score_before), round(100 * critique.score_end)
    if not critique.valid:
        return f'"{action}" is not possible here ("{seen}"), a wasted step.' if quote else \
            f'"{action}" is not possible here, a wasted step.'
    if critique.won:
        outcome = f"lead on to completing the task{within}" if later else "complete the task"
    elif end > before and critique.score_after > critique.score_before:
        outcome = f"raise the score from {before} to {end}"
    elif end > before:  # the rise came from the steps after it, not from the candidate itself
        outcome = f"lead on to the score rising from {before} to {end}{within}"
    elif min(critique.score_after, critique.score_end) < critique.score_before:
        outcome = f"lower the score from {before} to {end}"
    elif critique.evidence == "hindered":
        outcome = f"let the episode end in failure{within}" if later else "end the episode in failure"
    else:
        outcome = "not move the task forward"
    return f'"{action}" would show "{seen}" and {outcome}.' if quote else f'"{action}" would {outcome}.'


def _nearby_actions(job: _Job) -> list[str]:
    """Other actions of the trajectory, nearest to the step first: alternatives that exist in this task."""
    env, answer = job.trajectory.env, normalize(job.answer, job.trajectory.env)
    steps = job.trajectory.steps
    order = sorted(range(len(steps)), key=lambda i: (abs(i - job.step), i))
    found = []
    for i in order:
        action = normalize(steps[i].action, env)
        if action and action != answer and action not in found:
            found.append(action)
    return found


THOUGHT_FORMS = ("quotes", "outcome")


def fallback_thought(job: _Job, invented: list[str], fits: _Fits, form: str = "quotes") -> str | None:
    """A deliberation written from what is known when the writer fails twice: with critiques, each candidate
    in quotes with what executing it showed; without, the candidates (or the alternatives the writer did name,
    else other actions of the trajectory) and the answer.

    The first form that `fits` the agent's reply: every candidate with the observations quoted ("quotes"; with
    "outcome" the observations are never quoted, only what each candidate did to the task), then shorter quotes,
    then none, then fewer candidates, the shortest kept (the answer and one other are always named). None when not
    even that fits."""
    env = job.trajectory.env
    answer = normalize(job.answer, env)
    critiques = {a: c for a, c in job.options if c is not None}
    if critiques:
        others = [a for a, _ in job.options if a != answer]
    else:
        others = [a for a in ([a for a, _ in job.options] or invented or _nearby_actions(job)) if a != answer][:4]
    quotes = (100, 40, 0) if form == "quotes" else (0,)
    forms = [(quote, len(others)) for quote in quotes] + [(0, keep) for keep in range(len(others) - 1, 0, -1)]
    shortest_first = sorted(others, key=len)
    for quote, keep in forms:
        kept = shortest_first[:keep]
        parts = [DELIBERATION_PREFIX]
        if critiques:
            named = [a for a, _ in job.options if a == answer or a in kept]
            parts += [evidence_sentence(a, critiques[a], quote) if a in critiques else f'I could also "{a}".'
                      for a in named]
            parts += _verdict(answer, {a: c.evidence for a, c in critiques.items() if a in named})
        else:
            if kept:
                parts.append("I could " + " or ".join(f'"{a}"' for a in kept) + ".")
            parts.append(f'"{answer}" fits the task and what I see best.')
        parts.append(f'So I will "{answer}".')
        thought = " ".join(parts)
        if fits(thought, job.answer):
            return thought
    return None


def _verdict(answer: str, evidence: dict[str, str]) -> list[str]:
    """What an evidence-written thought says before its conclusion, so that the conclusion follows from what it
    said: the answer did the most, or (the answer no better than the rest and not advancing the task) that none of
    the candidates moves the task forward, rather than concluding at an action it has just said does not help."""
    if answer not in evidence:
        return []
    mine, others = _RANK[evidence[answer]], [_RANK[v] for a, v in evidence.items() if a != answer]
    if all(mine > r for r in others):
        return [f'Of these, "{answer}" does the most for the task.']
    if evidence[answer] == "advanced" or any(r > mine for r in others):
        return []
    if all(r == mine for r in others):
        return ["They all come to the same here, so I keep to the plan."]
    return ["None of these moves the task forward, so I keep to the plan."]


def _order(trajectory_id: str, step: int, actions: list[str]) -> list[str]:
    """A fixed pseudo-random order, so the answer is not always listed first."""
    return sorted(actions, key=lambda a: hashlib.sha1(f"{trajectory_id}:{step}:{a}".encode()).hexdigest())


def _option(action: str, critique: Critique | None) -> str:
    if critique is None:
        return f'- "{action}"'
    insight = critique.text.split("Insight:", 1)[-1].strip() if critique.insight_written else ""
    return f"- {evidence_sentence(action, critique)} {insight}".rstrip()


def _prompt(writer: Backend, job: _Job, mode: str, history_steps: int, strict: bool) -> str:
    t = job.trajectory
    options = "\n".join(_option(a, c) for a, c in job.options)
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


def _write(writer: Backend, jobs: list[_Job], todo: list[int], mode: str, params: SamplingParams,
           history_steps: int, strict: bool, fits: _Fits) -> dict[int, tuple[str | None, str | None, str]]:
    """Job index -> (the valid thought or None, why it was rejected, the writer's reply), in one generate call."""
    replies = writer.generate([_prompt(writer, jobs[i], mode, history_steps, strict) for i in todo], params)
    out = {}
    for i, [reply] in zip(todo, replies):
        job, text = jobs[i], f"{DELIBERATION_PREFIX} {reply.text.strip()}"
        valid, rejection = check(text, job.answer, job.names, job.trajectory.env, job.evidence)
        if valid is not None and not fits(valid, job.answer):
            valid, rejection = None, "does not fit the agent's reply budget"
        out[i] = (valid, rejection, text)
    return out


def _deliberate(writer: Backend, jobs: list[_Job], todo: list[int], mode: str, params: SamplingParams,
                history_steps: int, fits: _Fits, form: str) -> tuple[list[Deliberation], list[int]]:
    """The deliberations of jobs `todo`: the writer's thought, retried once under stricter instructions, else
    the fallback written from the evidence; and the jobs where not even the shortest fallback fits."""
    first = _write(writer, jobs, todo, mode, params, history_steps, False, fits)
    failed = [i for i in todo if first[i][0] is None]
    retry = _write(writer, jobs, failed, mode, params, history_steps, True, fits) if failed else {}
    made, unfit = [], []
    for i in todo:
        job = jobs[i]
        env, answer = job.trajectory.env, normalize(job.answer, job.trajectory.env)
        valid, rejection, reply = retry.get(i, first[i])
        thought = valid or fallback_thought(job, quoted_actions(reply, env), fits, form)
        if thought is None:
            unfit.append(i)
            continue
        weighed = job.names or [answer] + [a for a in quoted_actions(thought, env) if a != answer]
        repeated = any(repeats_itself(attempts[i][2]) for attempts in (first, retry) if i in attempts)
        made.append(Deliberation(
            job.trajectory.id, job.step, thought, job.answer, weighed, fallback=valid is None, retried=i in retry,
            mode=mode, rejection=rejection, repeated=repeated,
            named=len(named_candidates(thought, job.names, env)),
            valid=validate(thought, job.answer, job.names, env, job.evidence) == thought))
    return made, unfit


def synthesize(writer: Backend, trajectories: list[Trajectory], candidates: list[StepCandidates] | None,
               critiques: list[Critique] | None = None, rollouts: list[Rollout] | None = None,
               expert_switch: bool = False, batch_size: int = 64, max_new_tokens: int = 192,
               history_steps: int = 5, done: dict[tuple[str, int], Deliberation] | None = None,
               on_result: Callable[[list[Deliberation]], None] | None = None, reply_tokens: int | None = None,
               count_tokens: Callable[[str], int] | None = None, deliberate: str = "uncertain",
               thought_form: str = "quotes") -> Synthesis:
    """Deliberation thoughts for the uncertain steps and the dataset D_k.

    `reply_tokens`: the agent's reply budget (evaluation's `max_new_tokens`). Every thought, with the action
    line after it, fits in it as `count_tokens` (the agent's tokenizer; default the writer's) counts: a longer
    one would teach the agent replies that are cut off before their action. A step where not even the shortest
    fallback fits (candidates as long as the budget) is not deliberated: it keeps its thought, and
    `Synthesis.unfit` names it. None: no limit.

    `deliberate`: which uncertain steps get a deliberation: "uncertain", all of them; "separated", only those
    whose candidates' execution evidence differs (where every candidate came to the same, a deliberation has
    nothing to weigh): the others keep their thought, and `Synthesis.alike` names them. `thought_form`: how a
    thought written from the evidence speaks of the candidates (`fallback_thought`).

    Steps in `done` ((trajectory id, step) -> its deliberation, from an interrupted run) are not written again;
    each batch of `batch_size` new deliberations goes to `on_result` as soon as it is written.

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
    alike = []
    if deliberate == "separated":
        alike = [(job.trajectory.id, job.step) for job in jobs if not job.separated]
        jobs = [job for job in jobs if job.separated]
    elif deliberate != "uncertain":
        raise SandError(f"deliberate must be 'uncertain' or 'separated', not {deliberate!r}")
    if thought_form not in THOUGHT_FORMS:
        raise SandError(f"thought_form must be one of {', '.join(THOUGHT_FORMS)}, not {thought_form!r}")
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop=_STOP)
    count = count_tokens or writer.count_tokens

    def fits(thought: str, answer: str) -> bool:  # one token left for the end of the reply
        return reply_tokens is None or count(assistant_turn(Step(thought, answer, ""))) < reply_tokens

    done = done or {}
    todo = [i for i, job in enumerate(jobs) if (job.trajectory.id, job.step) not in done]
    made, unfit = {}, []
    for start in range(0, len(todo), batch_size):
        batch, skipped = _deliberate(writer, jobs, todo[start:start + batch_size], mode, params, history_steps, fits,
                                     thought_form)
        made.update({(d.trajectory_id, d.step): d for d in batch})
        unfit += [(jobs[i].trajectory.id, jobs[i].step) for i in skipped]
        if on_result:
            on_result(batch)
    keys = [(job.trajectory.id, job.step) for job in jobs]
    deliberations = [made.get(key) or done[key] for key in keys if key in made or key in done]
    return Synthesis(deliberations, build_dataset(trajectories, deliberations, switches), sorted(switches), unfit,
                     alike)


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
