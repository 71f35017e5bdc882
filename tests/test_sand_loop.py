"""The SAND loop's engine stages on real environments: two generated ALFWorld games and one
ScienceWorld variation, with tiny models. The agent pi_k is the tiny model trained here for a few
seconds on the expert steps, so that its samples are actions (varied ones: it is far from converged);
the writer pi_base is the untrained tiny model, whose replies never pass validation (fallback path)."""
from dataclasses import replace
from types import SimpleNamespace

import polars as pl
import pytest
import torch
from conftest import replay

from sand.envs.alfworld import AlfWorldEnv
from sand.envs.alfworld_gen import generate_games
from sand.envs.sciworld import ScienceWorldEnv
from sand import stages
from sand.evaluation import is_deliberation
from sand.experiment import EvalConfig, Experiment, SandConfig
from sand.experts import record_expert
from sand.models.backends import SamplingParams, TransformersBackend
from sand.models.registry import tiny_model
from sand.react import assistant_turn, conversation
from sand.rollout import RolloutEngine
from sand.sand_loop import DELIBERATION_PREFIX
from sand.sand_loop.actions import mentions, normalize
from sand.sand_loop.critique import (
    VERDICTS,
    Critique,
    Rollout,
    candidate_key,
    critique_candidates,
    critique_prompt,
    infer_verdict,
    parse_verdict,
)
from sand.sand_loop.sampling import (
    StepCandidates,
    collect_candidates,
    sample_candidates,
)
from sand.sand_loop.synthesis import dataset_id, synthesize, validate
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
from sand.schemas import CHECKPOINT_SCHEMA
from sand.store import Lineage, Store
from sand.trajectory import from_frame, to_frame

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
                                   ["Action: open drawer 1", "Thought: x\nAction: Open drawer 1.", "Action: open  drawer 1"])
    assert confident.candidates == ["open drawer 1"] and not confident.uncertain and confident.format_errors == 0


@pytest.mark.parametrize("reply, verdict", [
    ("Verdict: hindered\nInsight: If I open the fridge first, I waste a step.", "hindered"),
    ("Verdict: No effect.", "no effect"),
    ("Verdict: (advanced, hindered or no effect)", None),  # the format line echoed
    ("It did not advance the task at all.", "no effect"),
    ("This clearly advanced my goal.", "advanced"),
    ("Verdict:\nThe agent's task was to look around.", None),
    ("Verdict:\nhindered\nInsight: If I wait, nothing will advance.", "hindered"),
])
def test_verdict_parsing(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_verdict_inference_compares_with_the_other_candidates():
    assert infer_verdict(1.0, [0.0, 0.5]) == "advanced" and infer_verdict(0.0, [0.0, 0.5]) == "hindered"
    assert infer_verdict(0.5, [0.5]) == infer_verdict(0.5, []) == "no effect"


def test_sampling_finds_uncertain_steps_in_batches(sampled, alf, sci):
    trajectories = alf + sci
    assert [(c.trajectory_id, c.step) for c in sampled] == [(t.id, i) for t in trajectories for i in range(len(t.steps))]
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
    with AlfWorldEnv(train_games_dir=alf_dir) as env:
        for r in rollouts:
            t = by_id[r.trajectory_id]
            is_expert = r.action == normalize(t.steps[r.step].action, t.env)
            assert r.executed == (t.steps[r.step].action if is_expert else r.action)
            task = next(task for task in env.tasks("train") if task.task_id == t.task_id)
            prefix = [s.action for s in t.steps[:r.step]]
            # The first observation is the environment's own answer to the candidate after the prefix.
            assert r.observations[0] == replay(env, task, prefix + [r.executed]).observation
            assert r.actions[0] == r.executed and 1 <= len(r.actions) <= 3 and r.agent == "base"
    for c in critiques:
        assert c.verdict in VERDICTS and c.critic == "base" and c.text.startswith("Verdict:")
        assert c.verdict_inferred == (parse_verdict(c.text) is None)
    assert any(c.verdict_inferred for c in critiques)  # the untrained critic names no verdict


def test_critique_prompt_carries_goal_history_candidate_and_outcome(alf_critiques, alf, writer):
    _, rollouts, _, _, _ = alf_critiques
    r = max(rollouts, key=lambda r: r.prefix_len)
    t = next(t for t in alf if t.id == r.trajectory_id)
    prompt = critique_prompt(writer, t, r)
    assert t.instruction.split("Your task is to: ")[1].strip() in prompt
    assert f'the action "{r.action}"' in prompt and r.observations[0][:60] in " ".join(prompt.split())
    assert all(f'I did "{s.action}"' in prompt for s in t.steps[:r.prefix_len][-5:])
    assert "Verdict:" in prompt and "If I" in prompt


def test_critique_resumes_from_finished_keys(alf_critiques, alf, writer):
    steps, rollouts, _, _, engine = alf_critiques
    rewards = {r.key: r.reward for r in rollouts}
    assert critique_candidates(engine, writer, alf, steps, rollout_max_steps=2, done=rewards) == ([], [])
    missing = rollouts[-1].key
    del rewards[missing]
    again, judged = critique_candidates(engine, writer, alf, steps, rollout_max_steps=2, done=rewards,
                                        max_new_tokens=16)
    assert [r.key for r in again] == [c.key for c in judged] == [missing]


def test_synthesis_falls_back_and_dk_keeps_everything_else(writer, alf, sampled, alf_critiques):
    _, rollouts, critiques, _, _ = alf_critiques
    candidates = [c for c in sampled if c.trajectory_id in {t.id for t in alf}]
    result = synthesize(writer, alf, candidates, critiques, rollouts, max_new_tokens=48)
    uncertain = [c for c in candidates if c.uncertain]
    assert [(d.trajectory_id, d.step) for d in result.deliberations] == [(c.trajectory_id, c.step) for c in uncertain]
    # The untrained writer never concludes with the answer: retried once, then templated.
    assert result.fallbacks == result.retries == len(uncertain)
    critiqued = {(c.trajectory_id, c.step) for c in critiques}
    for d, c in zip(result.deliberations, uncertain):
        assert d.thought.startswith(DELIBERATION_PREFIX) and is_deliberation(d.thought) and d.mode == "sand"
        assert d.answer == c.expert_action and sorted(d.candidates) == sorted(c.candidates)
        assert validate(d.thought, d.answer, d.candidates, "alfworld") == d.thought  # fallbacks are valid too
        assert ("it would" in d.thought) == ((d.trajectory_id, d.step) in critiqued)  # foresight from critiques
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
    assert validate(f'{DELIBERATION_PREFIX} "open drawer 2" is good.', "open drawer 2",
                    ["open drawer 2", "go to desk 1"], "alfworld") is None  # one candidate only
    assert validate(f'{DELIBERATION_PREFIX} "go to desk 1" or "look".', "open drawer 2",
                    ["open drawer 2", "go to desk 1"], "alfworld") is None  # no conclusion
    invented = f'{DELIBERATION_PREFIX} I could "look" or "go to desk 1", but I will "put mug 1 on desk 1".'
    assert validate(invented, "put mug 1 in/on desk 1", None, "alfworld") == invented


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
                                observations=["o1", "invalid format", "o3"], reward=reward, done=True, agent="a"))
    critiques = [Critique(*r.key, trajectory_id=t.id, step=step, verdict="no effect", verdict_inferred=True, text="",
                          critic="base") for r in rollouts]
    kept = synthesize(writer, [t], candidates, critiques, rollouts, max_new_tokens=8).dataset[0]
    assert [s.action for s in kept.steps] == [s.action for s in t.steps]
    result = synthesize(writer, [t], candidates, critiques, rollouts, expert_switch=True, max_new_tokens=8)
    [switched] = result.dataset
    assert result.switched == [t.id] and switched.reward == 1.0
    assert [(s.action, s.observation) for s in switched.steps] == \
        [(s.action, s.observation) for s in t.steps[:step]] + [(alternative, "o1"), ("use desklamp 1", "o3")]
    assert result.deliberations[0].answer == alternative and switched.steps[step].thought.endswith(f'"{alternative}".')
    assert switched.steps[2].thought == "done"


def run_stages(folder, trajectories, agent_folder, make_env=None, pool_size=4, **sand) -> SimpleNamespace:
    """Sampling, critique and synthesis of iteration 1 through the engine's stages, on a store in `folder`
    whose D_0 is `trajectories` and whose pi_0 is the agent's folder; what they stored, as objects."""
    exp = Experiment(name="t", base_model=str(tiny_model()), evaluation=EvalConfig(pool_size=pool_size),
                     sand=SandConfig(**sand))
    store = Store(folder)
    store.write("trajectories", "t/d0", to_frame(trajectories), Lineage(asset="test"))
    store.write("checkpoints", "t/sft", pl.DataFrame([{
        "experiment": "t", "asset": "test", "iteration": 0, "path": str(agent_folder), "lora": False,
        "base_model": str(tiny_model()), "train_data": [], "loss_curve": []}], schema=CHECKPOINT_SCHEMA),
        Lineage(asset="test"))

    def backends(model, _settings):  # the agent's folder, or the untrained tiny model as critic and writer
        return TransformersBackend(model or tiny_model(), batch_size=32)

    def lineage_of(table):
        return Lineage(asset=f"t/iter_1/{table}")

    stages.sample(exp, store, 1, backends, lineage_of, code="test")
    stages.critique(exp, store, 1, backends, stages.Envs(lambda env: make_env), lineage_of, code="test")
    stages.synthesize(exp, store, 1, backends, lineage_of)
    return SimpleNamespace(candidates=candidates_from_frame(store.read("candidates", "t/iter_1")),
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
    for to_frame, from_frame, items in frames:
        df = to_frame(items)
        assert df.height == len(items) and from_frame(df) == items
    assert rollouts_frame(result.rollouts)["steps"].to_list() == [len(r.actions) for r in result.rollouts]
