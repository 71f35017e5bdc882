"""The SAND loop's engine stages on real environments: two generated ALFWorld games and one
ScienceWorld variation, with tiny models. The agent pi_k is the tiny model trained here for a few
seconds on the expert steps, so that its samples are actions (varied ones: it is far from converged);
the writer pi_base is the untrained tiny model, whose replies never pass validation (fallback path).
Tests marked slow put the real default model (SmolLM2-135M) in the critic's and the writer's place."""
import re
from dataclasses import replace
from types import SimpleNamespace

import polars as pl
import pytest
import torch
from conftest import replay

from sand import prompts, stages
from sand.envs.alfworld import AlfWorldEnv
from sand.envs.alfworld_gen import generate_games
from sand.envs.sciworld import ScienceWorldEnv
from sand.errors import SandError
from sand.evaluation import is_deliberation
from sand.experiment import EvalConfig, Experiment, SandConfig
from sand.experts import record_expert
from sand.models.backends import Completion, SamplingParams, TransformersBackend
from sand.models.registry import tiny_model
from sand.react import assistant_turn, conversation
from sand.rollout import RolloutEngine
from sand.sand_loop.actions import mentions, normalize
from sand.sand_loop.critique import (
    VERDICTS,
    Critique,
    Rollout,
    candidate_key,
    critique_candidates,
    critique_prompt,
    evidence_insight,
    evidence_text,
    evidence_verdict,
    pick_examples,
    task_goal,
    written_insight,
)
from sand.sand_loop.quality import critique_quality, deliberation_quality
from sand.sand_loop.sampling import (
    StepCandidates,
    collect_candidates,
    sample_candidates,
)
from sand.sand_loop.synthesis import (
    DELIBERATION_PREFIX,
    _Job,
    check,
    dataset_id,
    evidence_sentence,
    fallback_thought,
    repeats_itself,
    synthesize,
    validate,
)
from sand.sand_loop.tables import (
    candidates_frame,
    candidates_from_frame,
    critiques_frame,
    critiques_from_frame,
    deliberations_frame,
    deliberations_from_frame,
    rollouts_frame,
    rollouts_from_frame,
)
from sand.sand_loop.texts import echoes, repeats_sentence
from sand.schemas import CHECKPOINT_SCHEMA
from sand.store import Lineage, Store
from sand.trajectory import Step, from_frame, to_frame

torch.set_num_threads(1)



@pytest.fixture(scope="module")
def alf_dir(home):
    generate_games(home / "games", 2, seed=0)
    return home / "games"


@pytest.fixture(scope="module")
def alf(alf_dir):
    with AlfWorldEnv(train_games_dir=alf_dir) as env:
        return [record_expert(env, task, "observer") for task in env.tasks("train")]


@pytest.fixture(scope="module")
def sci():
    with ScienceWorldEnv(task_names=["find-plant"], variations_per_task=1) as env:
        return [record_expert(env, env.tasks("train")[0], "gold")]


@pytest.fixture(scope="module")
def writer(home):
    return TransformersBackend(tiny_model(), batch_size=16)


@pytest.fixture(scope="module")
def agent(home, alf, sci):
    """The tiny model trained on the expert steps (loss on the reply only) until it answers in the
    ReAct format, with random-ish actions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model())
    model = AutoModelForCausalLM.from_pretrained(tiny_model())
    examples = []
    for t in alf + sci:
        for i, step in enumerate(t.steps):
            prompt = tokenizer.apply_chat_template(conversation(t.env, t.instruction, t.steps[:i]), tokenize=False,
                                                   add_generation_prompt=True)
            examples.append((tokenizer(prompt).input_ids, tokenizer(assistant_turn(step) + "<|im_end|>").input_ids))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    for k in range(50):
        prompt, reply = examples[order[k % len(examples)]]
        ids = torch.tensor([prompt + reply])
        # Logits of the reply positions only: the 49k-token head over the whole prompt is most of the cost.
        hidden = model.model(input_ids=ids).last_hidden_state[:, len(prompt) - 1:-1]
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden)[0], torch.tensor(reply))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = home / "agent"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return TransformersBackend(folder, batch_size=32)


@pytest.fixture(scope="module")
def sampled(agent, alf, sci):
    return sample_candidates(agent, alf + sci, n=4, seed=0)


def test_normalisation_and_dedup_on_handmade_samples():
    assert normalize(' "Put Mug 1 on  desk 1." ', "alfworld") == "put mug 1 in/on desk 1"
    assert normalize("put mug 1 into fridge 1", "alfworld") == normalize("put mug 1 in/on fridge 1", "alfworld")
    assert normalize("Focus on the plant!", "sciworld") == "focus on the plant"
    assert mentions('I could "go to desk 1".', "go to desk 1") and not mentions("go to desk 10", "go to desk 1")

    uncertain = collect_candidates("t", 3, "alfworld", "put mug 1 in/on desk 1", [
        "Thought: on the desk\nAction: put mug 1 on desk 1.", "Action: go to desk 1", "no action here",
        "Action: 'go to desk 1'", "Thought: hm\nAction:"])
    assert uncertain.candidates == ["put mug 1 in/on desk 1", "go to desk 1"]
    assert (uncertain.n_samples, uncertain.format_errors, uncertain.uncertain) == (5, 2, True)
    confident = collect_candidates("t", 4, "alfworld", "open drawer 1",
                                   ["Action: open drawer 1", "Thought: x\nAction: Open drawer 1.",
                                    "Action: open  drawer 1"])
    assert confident.candidates == ["open drawer 1"] and not confident.uncertain and confident.format_errors == 0


def rollout(action="go to desk 1", valid=True, before=0.0, after=0.0, end=0.0, done=False, steps=3) -> Rollout:
    """A rollout with the evidence given (the rest does not matter to the rule)."""
    return Rollout("t", 2, "d", action, "traj", 2, action, [""] * steps, [action] + ["look"] * (steps - 1),
                   ["You see a desk."] * steps, end, done, "base", valid, before, after, end >= 1.0, "")


@pytest.mark.parametrize("case, expert, verdict", [
    (dict(valid=False, end=1.0), None, "hindered"),  # not accepted: what followed is not its doing
    (dict(end=1.0, done=True), None, "advanced"),  # won
    (dict(before=0.2, after=0.2, end=0.5), None, "advanced"),  # the score rose later in the rollout
    (dict(before=0.2, after=0.3, end=0.3), None, "advanced"),  # ... or right away
    (dict(before=0.5, after=0.2, end=0.2), None, "hindered"),  # the score fell
    (dict(before=0.2, after=0.2, end=0.2, done=True, steps=2), dict(done=True, steps=4), "hindered"),  # lost sooner
    (dict(before=0.2, after=0.2, end=0.2, done=True, steps=2), dict(done=False, steps=4), "hindered"),
    (dict(before=0.2, after=0.2, end=0.2, done=True, steps=4), dict(done=True, steps=4), "no effect"),  # not sooner
    (dict(before=0.2, after=0.2, end=0.2, steps=4), dict(done=True, steps=2), "no effect"),  # capped, not lost
    (dict(before=0.2, after=0.2, end=0.2), None, "no effect"),
])
def test_evidence_rule(case, expert, verdict):
    r = rollout(**case)
    assert evidence_verdict(r, rollout("open drawer 1", **expert) if expert else None) == verdict
    assert evidence_verdict(r, r) == evidence_verdict(r, None)  # the expert's own rollout is never "sooner"


def test_evidence_insight_says_what_the_evidence_shows():
    assert evidence_insight(rollout(valid=False)) == "If I go to desk 1 here, nothing happens and I lose a step."
    assert "complete the task" in evidence_insight(rollout(end=1.0, done=True))
    assert "score goes up" in evidence_insight(rollout(before=0.2, after=0.5, end=0.5))
    failed = rollout(before=0.2, after=0.2, end=0.2, done=True, steps=2)
    failed.evidence = "hindered"
    assert "ends in failure" in evidence_insight(failed)
    assert "does not progress" in evidence_insight(rollout())


def judged(evidence: str, **case) -> Rollout:
    r = rollout(**case)
    r.evidence = evidence
    return r


@pytest.mark.parametrize("evidence, case, reply", [
    # from cpu_bench round 1 (SmolLM2-135M): the insight claimed the opposite of what execution showed
    ("hindered", dict(action="open door to studio", valid=False), " open door to studio, the score goes up later on."),
    ("advanced", dict(action="open sink", before=0.0, after=0.03, end=0.03), " open sink, nothing happens."),
    ("advanced", dict(action="open sink", before=0.0, after=0.03, end=0.03),
     " open sink here, the task does not progress."),
    ("no effect", dict(action="look"), " look around, I can complete the task."),
    ("hindered", dict(action="go to desk 1", before=0.5, after=0.2, end=0.2), " go to desk 1, it helps me win."),
    # from the quickstart: a negation three words before the claim, "can not do it", another action
    ("advanced", dict(action="put pen 2 in/on drawer 1", before=0.0, after=0.5, end=0.5),
     " put pen 2 in/on drawer 1, I can not go on to complete the task."),
    ("advanced", dict(action="put creditcard 1 in/on drawer 1", before=0.0, after=0.5, end=0.5),
     " put creditcard 1 in/on drawer 1, I can not do it."),
    ("hindered", dict(action="put keychain 2 in/on any bin", valid=False),
     " put pen in drawer here, nothing happens."),
    ("hindered", dict(action="go to bathroom 2", valid=False),
     " put egg in bathroom here, I can go to the bathroom 2."),
])
def test_an_insight_that_contradicts_the_evidence_is_not_the_critics(evidence, case, reply):
    r = judged(evidence, **case)
    assert written_insight(reply, "an unrelated prompt", r, "alfworld") is None


@pytest.mark.parametrize("evidence, case, reply", [
    ("hindered", dict(action="open door to studio", valid=False), " open door to studio, nothing happens."),
    ("advanced", dict(action="open sink", before=0.0, after=0.03, end=0.03), " open sink, the score goes up."),
    ("no effect", dict(action="look"), " look around here, the task does not advance at all."),
    ("no effect", dict(action="go to desk 1"), " go to desk 1 first, I find a mug to take later."),  # no claim
    ("hindered", dict(action="put pen 2 in/on drawer 1", valid=False), " put pen 2 on drawer 1, nothing happens."),
    # the action's own words are no claim ("finish" names the action here)
    ("no effect", dict(action="finish the circuit"), " finish the circuit now, the light bulb stays off."),
])
def test_an_insight_true_to_the_evidence_is_kept(evidence, case, reply):
    r = judged(evidence, **case)
    assert written_insight(reply, "an unrelated prompt", r, "alfworld") == "If I" + reply.rstrip()


@pytest.mark.parametrize("case", [dict(valid=False), dict(end=1.0, done=True), dict(before=0.2, after=0.5, end=0.5),
                                  dict(before=0.2, after=0.2, end=0.6), dict(before=0.5, after=0.2, end=0.2),
                                  dict(done=True, steps=2), dict()])
def test_evidence_insights_never_contradict_their_evidence(case):
    r = rollout(**case)
    r.evidence = evidence_verdict(r, rollout("open drawer 1", done=True, steps=4))
    assert written_insight(evidence_insight(r)[len("If I"):], "an unrelated prompt", r) == evidence_insight(r)


def test_sampling_finds_uncertain_steps_in_batches(sampled, alf, sci):
    trajectories = alf + sci
    assert [(c.trajectory_id, c.step) for c in sampled] == \
        [(t.id, i) for t in trajectories for i in range(len(t.steps))]
    for c in sampled:
        t = next(t for t in trajectories if t.id == c.trajectory_id)
        assert c.expert_action == t.steps[c.step].action and c.candidates[0] == normalize(c.expert_action, t.env)
        assert c.n_samples == len(c.samples) == 4 and len(set(c.candidates)) == len(c.candidates)
        assert len(c.candidates) - 1 + c.format_errors <= 4 and c.uncertain == (len(c.candidates) > 1)
    assert sum(c.uncertain for c in sampled) >= len(sampled) // 2  # the barely trained agent disagrees often
    assert sum(len(c.candidates) - 1 for c in sampled) > 0


def test_sampling_resumes_and_reports_per_trajectory(agent, alf, sampled):
    done = {(c.trajectory_id, c.step) for c in sampled if c.trajectory_id == alf[0].id}
    done |= {(alf[1].id, i) for i in range(1, len(alf[1].steps))}
    reported = []
    new = sample_candidates(agent, alf, n=2, done=done, on_result=reported.append)
    assert [(c.trajectory_id, c.step) for c in new] == [(alf[1].id, 0)]
    assert [[(c.trajectory_id, c.step) for c in r] for r in reported] == [[(alf[1].id, 0)]]


@pytest.fixture(scope="module")
def alf_critiques(agent, writer, alf, alf_dir, sampled):
    """Rollouts and critiques of the first two uncertain ALFWorld steps (capped at 2 agent steps)."""
    steps = [c for c in sampled if c.uncertain and c.trajectory_id in {t.id for t in alf}][:2]
    batches = []
    with RolloutEngine(agent, lambda: AlfWorldEnv(train_games_dir=alf_dir), pool_size=2,
                       params=SamplingParams(temperature=1.0, max_new_tokens=48)) as engine:
        rollouts, critiques = critique_candidates(engine, writer, alf, steps, rollout_max_steps=2, critic_batch=3,
                                                  max_new_tokens=32, on_result=lambda r, c: batches.append((r, c)))
        yield steps, rollouts, critiques, batches, engine


def test_critique_rolls_out_every_candidate_in_the_real_environment(alf_critiques, alf, alf_dir):
    steps, rollouts, critiques, batches, _ = alf_critiques
    by_id = {t.id: t for t in alf}
    expected = {candidate_key(by_id[c.trajectory_id], c.step, a) for c in steps for a in c.candidates}
    assert {r.key for r in rollouts} == expected == {c.key for c in critiques}
    # Critiques go out in batches (a step is critiqued once all its rollouts have ended).
    assert len(batches) >= 2 and sum(len(c) for _, c in batches) == len(expected)
    by_key = {r.key: r for r in rollouts}
    with AlfWorldEnv(train_games_dir=alf_dir) as env:
        for r in rollouts:
            t = by_id[r.trajectory_id]
            is_expert = r.action == normalize(t.steps[r.step].action, t.env)
            assert r.executed == (t.steps[r.step].action if is_expert else r.action)
            task = next(task for task in env.tasks("train") if task.task_id == t.task_id)
            env.reset(task)
            for s in t.steps[:r.step]:
                env.step(s.action)
            before = env.score
            result = env.step(r.executed)
            # The evidence is the environment's own answer to the candidate after the prefix.
            assert (r.observations[0], r.valid, r.score_before, r.score_after) == \
                (result.observation, result.valid, before, result.score)
            assert r.actions[0] == r.executed and 1 <= len(r.actions) <= 3 and r.agent == "base"
            assert r.won == (r.reward >= 1)
            expert = by_key[candidate_key(t, r.step, t.steps[r.step].action)]
            assert r.evidence == evidence_verdict(r, expert)
    for c in critiques:
        r = by_key[c.key]
        assert c.verdict in VERDICTS and c.critic == "base" and not c.verdict_inferred  # chosen under constraint
        assert (c.valid, c.observation, c.score_before, c.score_after, c.score_end, c.won, c.steps, c.evidence) == \
            (r.valid, r.observations[0], r.score_before, r.score_after, r.reward, r.won, len(r.actions), r.evidence)
        verdict_line, insight_line = c.text.split("\n")
        assert verdict_line == f"Verdict: {c.verdict}" and insight_line.startswith("Insight: If I ")
        # The untrained critic's insights are noise: replaced by the evidence's own.
        assert c.insight_written or insight_line == f"Insight: {evidence_insight(r)}"
        assert_no_echo(c, r, by_id[r.trajectory_id])
    figures = critique_quality(critiques)
    assert figures["verdicts_written"] == len(critiques) and figures["written_verdict_rate"] == 1.0
    assert figures["verdict_agreement"] == round(sum(c.verdict == c.evidence for c in critiques) / len(critiques), 4)
    assert sum(figures[f"evidence/{v}"] for v in VERDICTS) == len(critiques)


def assert_no_echo(critique: Critique, rollout: Rollout, trajectory) -> None:
    """No critique text copies its prompt: the instruction, the candidate's evidence, or a format line."""
    insight = critique.text.split("Insight:", 1)[1]
    assert not echoes(insight, prompts.load("critique") + "\n" + evidence_text(task_goal(trajectory.instruction),
                                                                                rollout), (rollout.action,))
    assert "..." not in critique.text and "advanced, hindered" not in critique.text
    assert critique.text.count("Verdict:") == 1 and critique.text.count("Insight:") == 1
    assert not repeats_sentence(insight)


def test_critique_prompt_is_compact_evidence_after_examples_from_the_run(alf_critiques, alf, writer):
    _, rollouts, _, _, _ = alf_critiques
    r = max(rollouts, key=lambda r: r.prefix_len)
    t = next(t for t in alf if t.id == r.trajectory_id)
    examples = pick_examples(rollouts, r)
    assert len({e.evidence for e in examples}) == len(examples) >= 1  # one per verdict
    assert all(e.key[:3] != r.key[:3] and e.action != r.action for e in examples)  # never the judged step
    goals = [(task_goal(next(x for x in alf if x.id == e.trajectory_id).instruction), e) for e in examples]
    prompt = critique_prompt(writer, task_goal(t.instruction), r, goals)
    assert prompt.endswith("Verdict:") and t.instruction.split("Your task is to: ")[1].strip() in prompt
    assert f"Action: {r.action}\n" in prompt and r.observations[0][:60] in " ".join(prompt.split())
    assert f"{round(100 * r.score_before)} before, {round(100 * r.score_after)} right after" in prompt
    for e in examples:  # each example answered with its evidence verdict and the evidence's insight
        assert f"Verdict: {e.evidence}\nInsight: {evidence_insight(e)}" in prompt
    # Evidence, not a transcript: neither the expert's history nor the rollout's later steps are shown.
    assert not any(f'"{s.action}"' in prompt for s in t.steps[:r.prefix_len])
    assert "If I ..." not in prompt and "(advanced, hindered or no effect)" not in prompt


def test_critique_resumes_from_finished_keys(alf_critiques, alf, writer):
    steps, rollouts, _, _, engine = alf_critiques
    finished = {r.key: r for r in rollouts}
    assert critique_candidates(engine, writer, alf, steps, rollout_max_steps=2, done=finished) == ([], [])
    missing = rollouts[-1].key
    del finished[missing]
    again, judged = critique_candidates(engine, writer, alf, steps, rollout_max_steps=2, done=finished,
                                        max_new_tokens=16)
    assert [r.key for r in again] == [c.key for c in judged] == [missing]
    assert again[0].evidence in VERDICTS  # judged against the finished expert rollout of its step


def test_synthesis_falls_back_and_dk_keeps_everything_else(writer, alf, sampled, alf_critiques):
    _, rollouts, critiques, _, _ = alf_critiques
    candidates = [c for c in sampled if c.trajectory_id in {t.id for t in alf}]
    result = synthesize(writer, alf, candidates, critiques, rollouts, max_new_tokens=48)
    uncertain = [c for c in candidates if c.uncertain]
    assert [(d.trajectory_id, d.step) for d in result.deliberations] == [(c.trajectory_id, c.step) for c in uncertain]
    # The untrained writer never concludes with the answer: retried once, then templated.
    assert result.fallbacks == result.retries == len(uncertain)
    by_key = {c.key: c for c in critiques}
    for d, c in zip(result.deliberations, uncertain):
        assert d.thought.startswith(DELIBERATION_PREFIX) and is_deliberation(d.thought) and d.mode == "sand"
        assert d.answer == c.expert_action and sorted(d.candidates) == sorted(c.candidates)
        # Every candidate is quoted; the count leaves out quoted spans too long to be an action (> 12 words).
        assert d.valid and d.named == sum(len(a.split()) <= 12 for a in c.candidates) >= 2, d.thought
        assert d.rejection is not None
        t = next(t for t in alf if t.id == d.trajectory_id)
        judged = {a: by_key.get(candidate_key(t, d.step, a)) for a in c.candidates}
        evidence = {a: j.evidence for a, j in judged.items() if j}
        assert validate(d.thought, d.answer, d.candidates, "alfworld", evidence) == d.thought  # fallbacks are valid
        assert d.thought.endswith(f'So I will "{normalize(d.answer, "alfworld")}".') and not repeats_itself(d.thought)
        for a, j in judged.items():  # written from the evidence: each candidate with what executing it showed
            if j:
                assert f'"{a}" is not possible here' in d.thought if not j.valid else \
                    f'"{a}" would show "{" ".join(j.observation.replace(chr(34), chr(39)).split())[:40]}' in d.thought
    figures = deliberation_quality(result.deliberations)
    assert figures["fallback_rate"] == 1.0 and figures["deliberation_validity_rate"] == 1.0
    assert figures["distinct_candidates_per_deliberation"] >= 2
    deliberating = {(d.trajectory_id, d.step): d.thought for d in result.deliberations}
    assert result.switched == [] and len(result.dataset) == len(alf)
    for old, new in zip(alf, result.dataset):
        assert (new.id, new.source, new.reward, new.instruction) == (dataset_id(old.id), "sand", old.reward,
                                                                     old.instruction)
        assert [(s.action, s.observation) for s in new.steps] == [(s.action, s.observation) for s in old.steps]
        for i, (a, b) in enumerate(zip(old.steps, new.steps)):
            assert b.thought == deliberating.get((old.id, i), a.thought)
    assert dataset_id(dataset_id("x")) == dataset_id("x") == "x#sand"


def test_validation_accepts_a_good_thought_and_cuts_what_follows_the_conclusion():
    good = (f'{DELIBERATION_PREFIX} "go to desk 1" finds nothing new. "open drawer 2" may hold the key. '
            'So I will "open drawer 2". Then maybe I will go to desk 1.')
    cut = validate(good, "open drawer 2", ["open drawer 2", "go to desk 1"], "alfworld")
    assert cut == good[:good.index(" Then")]
    invented = f'{DELIBERATION_PREFIX} I could "look" or "go to desk 1", but I will "put mug 1 on desk 1".'
    assert validate(invented, "put mug 1 in/on desk 1", None, "alfworld") == invented


CANDIDATES = ["go to drawer 1", "go to drawer 2", "open drawer 1"]


@pytest.mark.parametrize("thought, reason", [
    # The degenerate writer of a quickstart: one sentence over and over.
    ('I will "go to drawer 1". I will "go to drawer 1". I will "go to drawer 2". I will "go to drawer 1".',
     "repeats itself"),
    ('I see three. "open drawer 1" is closed. "Open drawer 1" is closed! So I will "go to drawer 1".',
     "repeats itself"),
    # Degenerate thoughts SmolLM2 wrote for cpu_bench: a clause over and over; the opening sentence again; a run-on
    # that names the answer first and other actions after it.
    ('I will "go to drawer 1" and I will "open drawer 1" and I will "open drawer 1". So I will "go to drawer 1".',
     "repeats itself"),
    ('I will "go to drawer 1" and I will "go to drawer 2".\n\nI will "go to drawer 1" and I will "go to drawer 2". '
     'So I will "go to drawer 1".', "repeats itself"),
    ('I will "go to drawer 1" and I will "go to drawer 2" and I will "open drawer 1" and I',
     "does not conclude at the answer"),
    ('"go to drawer 2" helps. So I will "go to drawer 1".', None),
    ('It is good. So I will "go to drawer 1".', "names fewer than two candidates in quotes"),
    ('Going to drawer 2 or opening drawer 1. So I will "go to drawer 1".', "names fewer than two candidates in quotes"),
    ('"go to drawer 2" or "open drawer 1" could work.', "does not conclude at the answer"),
    ('"open drawer 1" is the best next step. So I will "go to drawer 1".',
     'calls "open drawer 1" good, but its evidence says it hindered'),
    ('"go to drawer 2" would be a waste of time. So I will "go to drawer 1".',
     'calls "go to drawer 2" bad, but its evidence says it advanced'),
    ('"open drawer 1" did not help at all, and "go to drawer 2" is not bad. So I will "go to drawer 1".', None),
    ('"open drawer 1" would not be useful. "go to drawer 2" could help. So I will "go to drawer 1".', None),
    # Quoted text is an action's name or what the environment said, not the writer's judgement.
    ('"open drawer 1" is not possible here ("Unknown action, see the list of possible objects that help"), a '
     'wasted step. "go to drawer 2" shows "You fail to see a bad thing." So I will "go to drawer 1".', None),
])
def test_validator_rejects_degenerate_and_untrue_thoughts(thought, reason):
    evidence = {"go to drawer 1": "no effect", "go to drawer 2": "advanced", "open drawer 1": "hindered"}
    text = f"{DELIBERATION_PREFIX} {thought}"
    cut, why = check(text, "go to drawer 1", CANDIDATES, "alfworld", evidence)
    assert why == reason and (cut is None) == (reason is not None)


def test_expert_switch_adopts_a_better_candidate_and_its_rollout(writer, alf):
    t = alf[0]
    step = 1
    expert = t.steps[step].action
    alternative = "go to garbagecan 1"
    candidates = [StepCandidates(t.id, step, expert, [normalize(expert, t.env), alternative], 2, 0, True, [])]
    rollouts = []
    for action, reward in ((normalize(expert, t.env), 0.0), (alternative, 1.0)):
        key = candidate_key(t, step, action)
        rollouts.append(Rollout(*key, trajectory_id=t.id, step=step, executed=action if reward else expert,
                                thoughts=["", "x", "done"], actions=[action, "", "use desklamp 1"],
                                observations=["o1", "invalid format", "o3"], reward=reward, done=True, agent="a",
                                valid=True, score_before=0.0, score_after=0.0, won=reward >= 1,
                                evidence="advanced" if reward else "no effect"))
    critiques = [Critique(*r.key, trajectory_id=t.id, step=step, verdict="no effect", verdict_inferred=False,
                          text="", critic="base", insight_written=False, valid=True, observation=r.observations[0],
                          score_before=0.0, score_after=0.0, score_end=r.reward, won=r.won, steps=3,
                          evidence=r.evidence) for r in rollouts]
    kept = synthesize(writer, [t], candidates, critiques, rollouts, max_new_tokens=8).dataset[0]
    assert [s.action for s in kept.steps] == [s.action for s in t.steps]
    result = synthesize(writer, [t], candidates, critiques, rollouts, expert_switch=True, max_new_tokens=8)
    [switched] = result.dataset
    assert result.switched == [t.id] and switched.reward == 1.0
    assert [(s.action, s.observation) for s in switched.steps] == \
        [(s.action, s.observation) for s in t.steps[:step]] + [(alternative, "o1"), ("use desklamp 1", "o3")]
    assert result.deliberations[0].answer == alternative and switched.steps[step].thought.endswith(f'"{alternative}".')
    assert switched.steps[2].thought == "done"



def test_synthesis_resumes_from_finished_steps(writer, alf, sampled, alf_critiques):
    _, rollouts, critiques, _, _ = alf_critiques
    candidates = [c for c in sampled if c.trajectory_id in {t.id for t in alf}]
    batches = []
    full = synthesize(writer, alf, candidates, critiques, rollouts, batch_size=2, max_new_tokens=16,
                      on_result=batches.append)
    assert len(full.deliberations) >= 3 and all(len(b) <= 2 for b in batches)
    assert [d for b in batches for d in b] == full.deliberations  # each batch handed over as it is written
    # An interrupted run's deliberations are taken as they are (marked here), and only the rest are written.
    done = {(d.trajectory_id, d.step): replace(d, thought=d.thought + " (kept)") for d in full.deliberations[:-1]}
    batches.clear()
    resumed = synthesize(writer, alf, candidates, critiques, rollouts, batch_size=2, max_new_tokens=16, done=done,
                         on_result=batches.append)
    last = full.deliberations[-1]
    assert [[(d.trajectory_id, d.step) for d in b] for b in batches] == [[(last.trajectory_id, last.step)]]
    assert resumed.deliberations[:-1] == list(done.values())
    thoughts = {(old.id, i): s.thought for old, t in zip(alf, resumed.dataset) for i, s in enumerate(t.steps)}
    assert all(thoughts[key] == d.thought for key, d in done.items())

class ScriptedWriter(TransformersBackend):
    """A writer whose every thought is valid: it names two of the prompt's candidates, then `filler` words,
    then the answer."""
    filler = 0

    def generate(self, prompts, params, adapter=None):
        out = []
        for prompt in prompts:
            answer = re.search(r'The last sentence must be: So I will "(.+?)"\.', prompt).group(1)
            other = next(a for a in re.findall(r'^- "([^"]+)"', prompt, re.M)
                         if normalize(a, "alfworld") != normalize(answer, "alfworld"))
            words = "".join(f" w{i}" for i in range(self.filler))
            text = f'"{other}" and "{answer}" are open{words}. So I will "{answer}".'
            out.append([Completion(text, 0, 0, "stop")])
        return out


def test_deliberations_fit_the_agents_reply_budget(writer, alf, sampled, alf_critiques):
    """A thought the agent cannot finish within its reply budget teaches it replies cut off before their action:
    the writer's are rejected, and the fallback drops quotes, then candidates, until it fits."""
    _, rollouts, critiques, _, _ = alf_critiques
    candidates = [c for c in sampled if c.trajectory_id in {t.id for t in alf}]

    def reply(d):
        return writer.count_tokens(assistant_turn(Step(d.thought, d.answer, "")))

    free = synthesize(writer, alf, candidates, critiques, rollouts, max_new_tokens=16)
    budget = max(reply(d) for d in free.deliberations)  # the longest does not fit
    bounded = synthesize(writer, alf, candidates, critiques, rollouts, max_new_tokens=16, reply_tokens=budget)
    for a, b in zip(free.deliberations, bounded.deliberations, strict=True):
        assert reply(b) < budget and b.valid and b.named >= 2 and b.fallback, b.thought
        assert b.thought.endswith(f'So I will "{normalize(b.answer, "alfworld")}".')
        assert b.thought == a.thought if reply(a) < budget else len(b.thought) < len(a.thought)
    assert any(a.thought != b.thought for a, b in zip(free.deliberations, bounded.deliberations))
    # Where not even the answer and one other candidate fit, the step keeps its thought.
    none = synthesize(writer, alf, candidates, critiques, rollouts, max_new_tokens=16, reply_tokens=8)
    assert none.deliberations == [] and none.unfit == [(d.trajectory_id, d.step) for d in free.deliberations]
    assert [[s.thought for s in t.steps] for t in none.dataset] == [[s.thought for s in t.steps] for t in alf]

    scripted = ScriptedWriter(tiny_model())
    kept = synthesize(scripted, alf, candidates, critiques, rollouts, reply_tokens=budget)
    assert not any(d.fallback or d.retried for d in kept.deliberations)  # short thoughts are the writer's
    scripted.filler = budget
    long = synthesize(scripted, alf, candidates, critiques, rollouts, reply_tokens=budget)
    assert all(d.fallback and d.retried and d.rejection == "does not fit the agent's reply budget"
               and reply(d) < budget for d in long.deliberations)


def test_the_fallback_shortens_quotes_then_names_fewer_candidates(alf):
    def judged(action, observation, evidence, valid=True):
        return Critique("t", 0, "", action, alf[0].id, 0, evidence, False, "", "critic", False, valid, observation,
                        0.0, 0.0, 0.0, False, 2, evidence)

    seen = "On the desk 1, you see " + ", ".join(f"a pen {i}" for i in range(20)) + "."
    job = _Job(alf[0], 0, "go to desk 1", [("examine drawer 1", judged("examine drawer 1", "Nothing happens.",
                                                                        "hindered", valid=False)),
                                           ("go to desk 1", judged("go to desk 1", seen, "no effect")),
                                           ("go to shelf 1", judged("go to shelf 1", seen, "hindered"))])
    forms, limit = [], 200
    while thought := fallback_thought(job, [], lambda t, answer, n=limit: len(t.split()) <= n):
        forms.append(thought)  # the thought under a shrinking word budget, until none fits
        limit = len(thought.split()) - 1
    assert len(forms) == 4
    quotes = [max((len(q) for q in re.findall(r'show "([^"]+)"', f)), default=0) for f in forms]
    assert quotes[0] > quotes[1] > quotes[2] == quotes[3] == 0  # 100, then 40 characters of each observation
    assert all(f'"{a}"' in f for f in forms[:3] for a in ("go to shelf 1", "go to desk 1", "examine drawer 1"))
    assert '"examine drawer 1"' not in forms[3] and '"go to shelf 1"' in forms[3]  # the answer and the shortest
    evidence = {a: c.evidence for a, c in job.options}
    for f in forms:
        assert validate(f, "go to desk 1", job.names, "alfworld", evidence) == f and f.endswith('"go to desk 1".')
    # The "outcome" form never quotes an observation: its longest thought is the quotes form's third.
    assert fallback_thought(job, [], lambda t, answer: True, "outcome") == forms[2]


def run_stages(folder, trajectories, agent_folder, make_env=None, pool_size=4, **sand) -> SimpleNamespace:
    """Sampling, critique and synthesis of iteration 1 through the engine's stages, on a store in `folder`
    whose D_0 is `trajectories` and whose pi_0 is the agent's folder; what they stored, as objects, with the
    backends the stages asked for (model, settings) and what each stage reported."""
    exp = Experiment(name="t", base_model=str(tiny_model()), evaluation=EvalConfig(pool_size=pool_size),
                     sand=SandConfig(**sand))
    store = Store(folder)
    store.write("trajectories", "t/d0", to_frame(trajectories), Lineage(asset="test"))
    store.write("checkpoints", "t/sft", pl.DataFrame([{
        "experiment": "t", "asset": "test", "iteration": 0, "path": str(agent_folder), "lora": False,
        "base_model": str(tiny_model()), "train_data": [], "loss_curve": []}], schema=CHECKPOINT_SCHEMA),
        Lineage(asset="test"))

    built = []

    def backends(model, settings):  # the agent's folder, or the untrained tiny model as critic and writer
        built.append((model, settings))
        return TransformersBackend(model or tiny_model(), batch_size=32)

    def lineage_of(table):
        return Lineage(asset=f"t/iter_1/{table}")

    reported = {"sample": stages.sample(exp, store, 1, backends, lineage_of, code="test").counts,
                "critique": stages.critique(exp, store, 1, backends, stages.Envs(lambda env: make_env), lineage_of,
                                            code="test").counts,
                "synthesize": stages.synthesize(exp, store, 1, backends, lineage_of, code="test").counts}
    return SimpleNamespace(built=built, reported=reported, exp=exp, store=store, lineage_of=lineage_of,
                           candidates=candidates_from_frame(store.read("candidates", "t/iter_1")),
                           rollouts=rollouts_from_frame(store.read("rollouts", "t/iter_1")),
                           critiques=critiques_from_frame(store.read("critiques", "t/iter_1")),
                           deliberations=deliberations_from_frame(store.read("deliberations", "t/iter_1")),
                           dataset=from_frame(store.read("trajectories", "t/iter_1")))


def test_ablation_without_critique_runs_no_rollouts(agent, home, alf, alf_dir, tmp_path):
    envs = []

    def make_env():
        envs.append(AlfWorldEnv(train_games_dir=alf_dir))
        return envs[-1]

    result = run_stages(tmp_path, alf[:1], home / "agent", make_env, n_samples=3, critique=False)
    assert envs == [] and result.rollouts == [] and result.critiques == []
    uncertain = [(c.trajectory_id, c.step) for c in result.candidates if c.uncertain]
    assert [(d.trajectory_id, d.step) for d in result.deliberations] == uncertain
    assert all(d.mode == "no_critique" and d.thought.startswith(DELIBERATION_PREFIX) for d in result.deliberations)


def test_ablation_without_sampling_deliberates_every_step(agent, home, alf, tmp_path):
    result = run_stages(tmp_path, alf, home / "agent", self_consistency=False)
    assert result.candidates == [] and result.rollouts == [] and result.critiques == []
    steps = [(t.id, i) for t in alf for i in range(len(t.steps))]
    assert [(d.trajectory_id, d.step) for d in result.deliberations] == steps
    assert all(d.mode == "no_sampling" and d.thought.startswith(DELIBERATION_PREFIX) and d.thought.endswith(
        f'"{normalize(d.answer, "alfworld")}".') for d in result.deliberations)
    assert all(s.thought.startswith(DELIBERATION_PREFIX) for t in result.dataset for s in t.steps)

    class Unreachable(TransformersBackend):
        def generate(self, prompts, params, adapter=None):
            raise AssertionError("a finished deliberation was written again")

    # Run again, the synthesis finds every deliberation in its work log and stores the same D_1.
    version = result.store.head("trajectories", "t/iter_1").version
    stages.synthesize(result.exp, result.store, 1, lambda model, settings: Unreachable(tiny_model()),
                      result.lineage_of, code="test")
    assert result.store.head("trajectories", "t/iter_1").version == version


def test_full_iteration_on_sciworld_and_tables_round_trip(agent, home, sci, tmp_path):
    t = replace(sci[0], steps=sci[0].steps[:5])  # an expert prefix is a shorter trajectory: fewer rollouts
    result = run_stages(tmp_path, [t], home / "agent", lambda: ScienceWorldEnv(task_names=["find-plant"]),
                        pool_size=2, n_samples=2, rollout_max_steps=1)
    uncertain = [c for c in result.candidates if c.uncertain]
    assert uncertain and len(result.rollouts) == len(result.critiques) == sum(len(c.candidates) for c in uncertain)
    assert all(1 <= len(r.actions) <= 2 for r in result.rollouts)
    assert not any(r.done for r in result.rollouts if len(r.actions) == 2 and r.reward < 1)  # stopped by the cap
    with ScienceWorldEnv(task_names=["find-plant"]) as env:
        task = env.tasks("train")[0]
        for r in result.rollouts[:3]:
            prefix = [s.action for s in t.steps[:r.prefix_len]]
            assert r.observations[0] == replay(env, task, prefix + [r.executed]).observation
    assert len(result.deliberations) == len(uncertain)
    [dk] = result.dataset
    assert sum(s.thought.startswith(DELIBERATION_PREFIX) for s in dk.steps) == len(uncertain)

    frames = [(candidates_frame, candidates_from_frame, result.candidates),
              (rollouts_frame, rollouts_from_frame, result.rollouts),
              (critiques_frame, critiques_from_frame, result.critiques),
              (deliberations_frame, deliberations_from_frame, result.deliberations)]
    for to_table, from_table, items in frames:
        df = to_table(items)
        assert df.height == len(items) and from_table(df) == items
    assert rollouts_frame(result.rollouts)["steps"].to_list() == [len(r.actions) for r in result.rollouts]


def test_ablation_deliberations_name_two_candidates_and_conclude(writer, alf, sampled):
    """Without critiques (the writer weighs the sampled candidates) and without sampling (it invents the
    alternatives; failing that, the fallback takes other actions of the trajectory), every deliberation is valid."""
    candidates = [c for c in sampled if c.trajectory_id in {t.id for t in alf}]
    for result, names in ((synthesize(writer, alf, candidates, None, max_new_tokens=24), True),
                          (synthesize(writer, alf[:1], None, max_new_tokens=24), False)):
        assert result.deliberations and all(d.valid and d.named >= 2 for d in result.deliberations)
        for d in result.deliberations:
            answer = normalize(d.answer, "alfworld")
            assert d.thought.endswith(f'So I will "{answer}".') and not repeats_itself(d.thought)
            assert validate(d.thought, d.answer, d.candidates if names else None, "alfworld") == d.thought


@pytest.fixture(scope="module")
def smollm2(home):
    """The real default model (SmolLM2-135M-Instruct) as critic and writer."""
    from sand.models.registry import resolve_model

    return TransformersBackend(resolve_model("smollm2-135m"), batch_size=8)


@pytest.mark.slow
def test_the_real_critic_and_writer_write_grounded_texts(smollm2, agent, alf, alf_dir, sampled):
    steps = [c for c in sampled if c.uncertain and c.trajectory_id in {t.id for t in alf}][:2]
    with RolloutEngine(agent, lambda: AlfWorldEnv(train_games_dir=alf_dir), pool_size=2,
                       params=SamplingParams(temperature=1.0, max_new_tokens=48)) as engine:
        rollouts, critiques = critique_candidates(engine, smollm2, alf, steps, rollout_max_steps=2)
    by_id, by_key = {t.id: t for t in alf}, {r.key: r for r in rollouts}
    assert critiques and all(not c.verdict_inferred for c in critiques)
    for c in critiques:
        assert_no_echo(c, by_key[c.key], by_id[c.trajectory_id])
    result = synthesize(smollm2, alf, steps, critiques, rollouts, max_new_tokens=96)
    for d in result.deliberations:
        assert d.valid and d.named >= 2 and not repeats_itself(d.thought)
        assert d.thought.endswith(f'So I will "{normalize(d.answer, "alfworld")}".') or \
            normalize(d.thought.rsplit('"', 2)[-2], "alfworld") == normalize(d.answer, "alfworld")


def test_a_critic_model_of_its_own_critiques_and_writes(agent, home, alf, alf_dir, tmp_path):
    """`sand.critic_model` with its own backend settings: the critique and synthesis stages build the critic
    from them (not from the agent's base model), critiques name it, and the stages report the quality figures."""
    from sand.experiment import BackendConfig
    from sand.models.registry import model_hash

    critic = tiny_model(tmp_path / "critic")  # a model of its own (the tiny weights again, in another folder)
    settings = BackendConfig(kind="transformers", options={"batch_size": 4})
    result = run_stages(tmp_path / "store", alf[:1], home / "agent",
                        lambda: AlfWorldEnv(train_games_dir=alf_dir), n_samples=2, rollout_max_steps=1,
                        critic_model=str(critic), critic_backend=settings)
    assert [b for b in result.built if b[0] == str(critic)] == [(str(critic), settings)] * 2  # critic, writer
    assert result.critiques and {c.critic for c in result.critiques} == {f"{critic}@{model_hash(critic)}"}
    critique, synthesis = result.reported["critique"], result.reported["synthesize"]
    assert critique["verdicts_written"] == len(result.critiques) and critique["written_verdict_rate"] == 1.0
    assert critique["verdict_agreement"] == round(
        sum(c.agrees for c in result.critiques) / len(result.critiques), 4)
    assert synthesis["deliberation_validity_rate"] == 1.0 and synthesis["fallback_rate"] == 1.0
    assert synthesis["distinct_candidates_per_deliberation"] >= 2
    assert synthesis["repeated_sentence_rate"] == round(
        sum(d.repeated for d in result.deliberations) / len(result.deliberations), 4)


def test_an_evidence_written_thought_concludes_from_what_it_says(alf):
    """A thought never ends at an action it has just said does not help while naming no better one."""
    def thought(answer, verdicts):
        options = [(a, Critique("t", 0, "", a, alf[0].id, 0, v, False, "", "critic", False, True, "Nothing happens.",
                                0.0, 0.0, 0.0, False, 2, v)) for a, v in verdicts.items()]
        return fallback_thought(_Job(alf[0], 0, answer, options), [], lambda t, a: True)

    desk, shelf, drawer = "go to desk 1", "go to shelf 1", "open drawer 1"
    alike = thought(desk, {desk: "no effect", shelf: "no effect"})
    assert "They all come to the same here, so I keep to the plan." in alike
    level = thought(desk, {desk: "no effect", shelf: "no effect", drawer: "hindered"})
    assert "None of these moves the task forward, so I keep to the plan." in level
    best = thought(desk, {desk: "no effect", shelf: "hindered"})
    assert f'Of these, "{desk}" does the most for the task.' in best
    helps = thought(desk, {desk: "advanced", shelf: "advanced"})  # it helps: nothing to reconcile
    behind = thought(desk, {desk: "no effect", shelf: "advanced"})  # names a better one: says none is futile
    for text in (alike, level, best, helps, behind):
        assert text.endswith(f'So I will "{desk}".') and validate(text, desk, None, "alfworld") == text
    assert not any(s in t for t in (helps, behind) for s in ("They all", "None of these", "Of these"))


def test_separated_deliberates_only_where_the_evidence_tells_the_candidates_apart(writer, alf, sampled,
                                                                                 alf_critiques):
    _, rollouts, critiques, _, _ = alf_critiques
    candidates = [c for c in sampled if c.trajectory_id in {t.id for t in alf}]
    verdicts = {}
    for c in critiques:
        verdicts.setdefault((c.trajectory_id, c.step), set()).add(c.evidence)
    every = synthesize(writer, alf, candidates, critiques, rollouts, max_new_tokens=16)
    chosen = synthesize(writer, alf, candidates, critiques, rollouts, max_new_tokens=16, deliberate="separated")
    assert {(d.trajectory_id, d.step) for d in chosen.deliberations} == {
        (d.trajectory_id, d.step) for d in every.deliberations  # a step without critiques is not known alike
        if len(verdicts.get((d.trajectory_id, d.step), "unknown")) > 1}
    assert set(chosen.alike) == {key for key, seen in verdicts.items() if len(seen) == 1}
    assert every.alike == []
    with pytest.raises(SandError, match="deliberate must be"):
        synthesize(writer, alf, candidates, critiques, rollouts, deliberate="sometimes")


@pytest.mark.parametrize(("won", "evidence", "steps", "after", "end", "said"), [
    (True, "advanced", 1, 0.5, 0.5, "would complete the task."),
    (True, "advanced", 3, 0.5, 0.5, "would lead on to completing the task within 2 more steps."),
    (False, "hindered", 1, 0.5, 0.5, "would end the episode in failure."),
    (False, "hindered", 2, 0.5, 0.5, "would let the episode end in failure within 1 more step."),
    (False, "advanced", 2, 0.6, 0.6, "would raise the score from 50 to 60."),
    (False, "advanced", 3, 0.5, 0.6, "would lead on to the score rising from 50 to 60 within 2 more steps."),
])
def test_an_evidence_sentence_counts_the_steps_after_the_candidate(won, evidence, steps, after, end, said):
    """Each sentence says what the candidate itself did and what the steps after it did, and counts them."""
    c = Critique("t", 0, "", "open door", "t1", 0, evidence, False, "", "critic", False, True, "The door opens.",
                 0.5, after, end, won, steps, evidence)
    assert evidence_sentence("open door", c, quote=0) == f'"open door" {said}'
