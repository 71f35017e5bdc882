"""The rollout engine on real environments (ScienceWorld JVMs, ALFWorld games) with real tiny models.

Two models: the seeded random tiny Llama (garbage replies: format errors), and `scripted_model`, the tiny
Llama trained in a second to answer every prompt with one fixed ReAct reply (valid and invalid actions).
"""
import itertools
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import replay

from sand.envs.alfworld import AlfWorldEnv
from sand.envs.alfworld_gen import generate_games
from sand.envs.sciworld import ScienceWorldEnv
from sand.errors import SandError
from sand.models import SamplingParams, tiny_model
from sand.models.backends import TransformersBackend
from sand.react import conversation
from sand.rollout import FORMAT_ERROR, EpisodeRequest, RolloutEngine, agent_prompt, history_window
from sand.trajectory import Step

torch.set_num_threads(1)
SCI_TASKS = ["lifespan-longest-lived", "find-non-living-thing"]
PARAMS = SamplingParams(max_new_tokens=24)
# Every token of it (and the "\n" that ends the generation prompt) has a single successor, so a bigram model
# can say it whatever the prompt. It names two quoted candidates: a deliberation.
SCRIPTED_REPLY = "Thought: \"open door\" or 'wait'.\n  Action : look around"


def scripted_model(folder: Path, reply: str = SCRIPTED_REPLY) -> Path:
    """The tiny Llama turned into a bigram model (attention outputs zeroed, so a token's successor depends
    on that token only) and trained until it answers any chat prompt with `reply`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = tiny_model()
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    ids = tokenizer("\n" + reply + tokenizer.eos_token).input_ids
    pairs = set(itertools.pairwise(ids))
    assert len({a for a, _ in pairs}) == len(ids) - 1, "a token repeats: a bigram model could not say the reply"
    for layer in model.model.layers:
        torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
    optimizer = torch.optim.Adam([p for n, p in model.named_parameters() if "o_proj" not in n], lr=1e-2)
    batch = torch.tensor([ids])
    for _ in range(300):
        loss = model(input_ids=batch, labels=batch).loss
        if loss.item() < 1e-3:
            break
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder



@pytest.fixture(scope="module")
def tiny(home):
    with TransformersBackend(tiny_model(), dtype="float32") as backend:
        yield backend


@pytest.fixture(scope="module")
def scripted(home):
    with TransformersBackend(scripted_model(home / "scripted"), dtype="float32") as backend:
        yield backend


@pytest.fixture(scope="module")
def sci(home):
    """A ScienceWorld env for listing tasks, gold paths and reference replays."""
    with ScienceWorldEnv(task_names=SCI_TASKS, variations_per_task=3) as env:
        yield env


@pytest.fixture(scope="module")
def alf_tasks():
    with AlfWorldEnv() as env:
        return env.tasks("valid_seen")[:4]


class NoAdmissible(ScienceWorldEnv):
    """A real ScienceWorld env that fails the test if asked for its (costly) valid-action list."""

    def admissible_actions(self):
        raise AssertionError("the engine called admissible_actions()")


class CountingBackend(TransformersBackend):
    """The real backend, recording the batch size of every generate call."""

    calls: list[int]

    def generate(self, prompts, params, adapter=None):
        self.calls.append(len(prompts))
        return super().generate(prompts, params, adapter)


def test_one_call_per_tick_pool_reuse_and_continuous_admission(home, sci):
    backend = CountingBackend(tiny_model(), dtype="float32")
    backend.calls = []
    made, ticks = [], []

    def make_env():
        made.append(NoAdmissible(task_names=SCI_TASKS))
        return made[-1]

    tasks = sci.tasks("dev")
    limits = [1, 3, 2, 4, 2]
    requests = [EpisodeRequest(t, key=str(i), max_steps=n) for i, (t, n) in enumerate(zip(tasks, limits))]
    with RolloutEngine(backend, make_env, pool_size=2, params=PARAMS, on_tick=ticks.append) as engine:
        results = list(engine.run(requests))
        # A freed env takes the next request; the newcomer resets during the next tick and joins the one after.
        assert backend.calls == [len(t.prompts) for t in ticks] == [2, 1, 2, 1, 1, 2, 2, 1]
        assert [r.request.key for r in results] == ["0", "1", "2", "4", "3"]  # in the order they ended
        replies = Counter(r.key for t in ticks for r in t.requests)  # ticks name the episodes they answered
        assert replies == {r.key: r.max_steps for r in requests}
        for result in results:
            n = result.request.max_steps
            assert len(result.steps) == len(result.replies) == result.format_errors == n  # garbage replies
            assert all(s.action == "" and s.observation == FORMAT_ERROR for s in result.steps)
            assert result.invalid_actions == 0 and result.reward == 0.0 and result.done
            assert result.prompt_tokens > 0 and 0 < result.completion_tokens <= n * PARAMS.max_new_tokens
        # An abandoned run frees its environments; later runs reuse the pool.
        abandoned = engine.run(requests)
        next(abandoned)
        abandoned.close()
        assert len(list(engine.run(requests[:3]))) == 3
    assert len(made) == 2


def test_batched_greedy_matches_one_by_one(home, tiny, sci, alf_tasks):
    """The tiny model in fp32: left padding in batches changes no greedy token here (all replies equal)."""
    for make_env, tasks in [(lambda: ScienceWorldEnv(task_names=SCI_TASKS), sci.tasks("dev")[:4]),
                            (AlfWorldEnv, alf_tasks)]:
        requests = [EpisodeRequest(t, max_steps=4) for t in tasks]
        runs = []
        for pool_size in (1, 4):
            with RolloutEngine(tiny, make_env, pool_size, PARAMS) as engine:
                runs.append({r.request.task.task_id: r for r in engine.run(requests)})
        one_by_one, batched = runs
        assert len({len(r.instruction) for r in batched.values()}) > 1  # prompts of different lengths: padding
        for task_id, result in one_by_one.items():
            assert result.replies == batched[task_id].replies and result.steps == batched[task_id].steps


def test_prefix_replay_and_forced_first_action(home, tiny, sci):
    task = sci.tasks("dev")[0]
    gold = sci.expert_actions(task)
    prefix = tuple(Step(f"t{i}", a, "") for i, a in enumerate(gold))
    k = 3
    expected = replay(sci, task, gold[:k] + ["fly to the moon"])
    ticks = []
    with RolloutEngine(tiny, lambda: ScienceWorldEnv(task_names=SCI_TASKS), 2, PARAMS,
                       on_tick=ticks.append) as engine:
        solved, forked, finished = sorted(engine.run([
            EpisodeRequest(task, key="solved", prefix=prefix),
            EpisodeRequest(task, key="forked", prefix=prefix[:k], first_action="fly to the moon",
                           first_thought="Maybe fly.", max_agent_steps=2),
            EpisodeRequest(task, key="finished", prefix=prefix[:-1], first_action=gold[-1]),
        ]), key=lambda r: ["solved", "forked", "finished"].index(r.request.key))
    # The expert path ends the episode during replay: no model call for it.
    assert solved.reward == 1.0 and solved.done and not solved.agent_steps and not solved.replies
    assert [s.action for s in solved.steps] == gold[:len(solved.steps)]
    assert [s.thought for s in solved.steps] == [f"t{i}" for i in range(len(solved.steps))]
    assert finished.reward == 1.0 and finished.done and not finished.agent_steps
    # The fork: the replayed prefix, the forced candidate (not understood), then two agent steps.
    assert [s.action for s in forked.steps[:k + 1]] == gold[:k] + ["fly to the moon"]
    assert forked.steps[k].thought == "Maybe fly." and forked.steps[k].observation == expected.observation
    assert len(forked.agent_steps) == 2 and len(forked.steps) == k + 3
    assert forked.reward == expected.score and forked.invalid_actions == 0  # forced steps are not the agent's
    assert sum(len(t.prompts) for t in ticks) == 2


def test_forced_prefix_wins_a_generated_alfworld_game(home, tiny):
    generate_games(home / "train_games", 1, seed=3)
    with AlfWorldEnv(train_games_dir=home / "train_games") as env:
        [task] = env.tasks("train")
        actions = env.expert_actions(task)
    with RolloutEngine(tiny, lambda: AlfWorldEnv(train_games_dir=home / "train_games"), 1, PARAMS) as engine:
        [result] = engine.run([EpisodeRequest(task, prefix=tuple(Step("", a, "") for a in actions[:-1]),
                                              first_action=actions[-1])])
    assert result.reward == 1.0 and result.done and len(result.steps) == len(actions)


def test_actions_are_executed_invalid_ones_counted_and_step_limits_honoured(home, scripted, sci, alf_tasks):
    with RolloutEngine(scripted, lambda: ScienceWorldEnv(task_names=SCI_TASKS), 2, PARAMS) as engine:
        results = list(engine.run([EpisodeRequest(t, max_steps=3) for t in sci.tasks("dev")[:2]]))
    for result in results:
        assert [s.action for s in result.steps] == ["look around"] * 3
        assert result.format_errors == result.invalid_actions == 0
        assert "This room is called" in result.steps[0].observation
    # ALFWorld has no "look around"; the env's own limit (3) wins over a larger request.
    with RolloutEngine(scripted, lambda: AlfWorldEnv(max_steps=3), 2, PARAMS) as engine:
        results = list(engine.run([EpisodeRequest(t, max_steps=10) for t in alf_tasks[:2]]))
    for result in results:
        assert len(result.steps) == result.invalid_actions == 3 and result.format_errors == 0
        assert {s.observation for s in result.steps} == {"Nothing happens."}
        assert result.steps[0].thought == "\"open door\" or 'wait'."


@pytest.mark.parametrize("history", [1, 2, 5, 6, 8])
def test_history_window_is_bounded_and_prompts_extend_each_other_between_moves(history):
    steps = [Step(f"t{i}", f"a{i}", f"o{i}") for i in range(40)]
    windows = [history_window(steps[:n], history) for n in range(len(steps) + 1)]
    assert windows[:history + 1] == [steps[:n] for n in range(history + 1)]  # everything while it fits
    moves = 0
    for n, (before, window) in enumerate(itertools.pairwise(windows), start=1):
        assert window == steps[n - len(window):n]  # the newest steps, in order
        assert history // 2 + 1 <= len(window) <= history or n <= history
        if window[:len(before)] != before:  # the prompt's prefix changed: the window moved
            moves += 1
    assert moves == (len(steps) - history - 1) // max(1, history // 2) + 1  # once a stride, not once a turn
    assert history_window(steps, None) == steps


def test_prompts_drop_their_oldest_steps_to_fit_the_context_and_say_when_nothing_fits(home, sci):
    task = sci.tasks("dev")[0]
    instruction = sci.reset(task)
    steps = [Step(f"thought {i}", f"action {i}", f"observation {i}") for i in range(30)]
    reply = PARAMS.max_new_tokens
    with TransformersBackend(tiny_model(), dtype="float32") as probe:
        bare = probe.count_tokens(agent_prompt(probe, "sciworld", instruction, [], None, 0))
    with TransformersBackend(tiny_model(), dtype="float32", max_model_len=bare + reply + 150) as backend:
        limit = backend.context_length
        short = agent_prompt(backend, "sciworld", instruction, steps[:2], None, reply)
        assert short == backend.render(conversation("sciworld", instruction, steps[:2]))  # fits: shown whole
        prompt = agent_prompt(backend, "sciworld", instruction, steps, None, reply)
        assert backend.count_tokens(prompt) + reply <= limit
        shown = prompt.count("Observation: observation")
        assert 0 < shown < len(steps)
        assert prompt == backend.render(conversation("sciworld", instruction, steps[-shown:]))  # the newest
        # Only as many steps as needed were dropped: one more would not fit.
        longer = backend.render(conversation("sciworld", instruction, steps[-shown - 1:]))
        assert backend.count_tokens(longer) + reply > limit

        # The engine fits every turn of an episode longer than the context holds, and the episode runs to its end.
        ticks = []
        with RolloutEngine(backend, lambda: ScienceWorldEnv(task_names=SCI_TASKS), 1, PARAMS,
                           on_tick=ticks.append) as engine:
            [result] = engine.run([EpisodeRequest(task, max_steps=8)])
        assert len(result.steps) == 8
        counts = [backend.count_tokens(p) for tick in ticks for p in tick.prompts]
        assert max(counts) + reply <= limit
        assert ticks[-1].prompts[0].count("Observation:") < 7  # the last turn's prompt dropped early steps

        with pytest.raises(SandError, match=rf"context is {limit} tokens"):
            agent_prompt(backend, "sciworld", instruction + " Be quick." * 60, steps, None, reply)
