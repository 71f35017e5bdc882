"""The evaluation harness on real ALFWorld games and ScienceWorld variations with real tiny models."""
import json

import pytest
import torch
from test_rollout import SCI_TASKS, CountingBackend, scripted_model

from sand.envs.alfworld import AlfWorldEnv
from sand.envs.sciworld import ScienceWorldEnv
from sand.evaluation import EpisodeRecord, evaluate, is_deliberation, summarize
from sand.models import tiny_model
from sand.models.backends import TransformersBackend

torch.set_num_threads(1)



@pytest.fixture(scope="module")
def tiny(home):
    backend = CountingBackend(tiny_model(), dtype="float32")
    backend.calls = []
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def sci_tasks(home):
    with ScienceWorldEnv(task_names=SCI_TASKS, variations_per_task=3) as env:
        return env.tasks("dev")


def sciworld():
    return ScienceWorldEnv(task_names=SCI_TASKS)


def test_garbage_replies_are_recorded_format_errors(home, tiny, sci_tasks):
    with AlfWorldEnv() as env:
        alf_tasks = env.tasks("valid_seen")[:2]
    records = evaluate(tiny, AlfWorldEnv, alf_tasks, pool_size=2, max_steps=3, max_new_tokens=16)
    records += evaluate(tiny, sciworld, sci_tasks[:2], pool_size=2, max_steps=3, max_new_tokens=16)
    assert [(r.env, r.task_id) for r in records] == [(t.env, t.task_id) for t in alf_tasks + sci_tasks[:2]]
    for r in records:
        assert r.steps == r.format_errors == 3 and r.invalid_actions == r.deliberation_steps == 0
        assert 0.0 <= r.reward <= 1.0 and r.success == (r.reward >= 1.0)
        assert r.prompt_tokens > 0 and 0 < r.completion_tokens <= 3 * 16
    assert [(s["env"], s["split"], s["n"], s["format_error_rate"]) for s in summarize(records)] == \
        [("alfworld", "valid_seen", 2, 1.0), ("sciworld", "dev", 2, 1.0)]


def test_rerun_skips_recorded_episodes(home, tiny, sci_tasks, tmp_path):
    path = tmp_path / "results" / "sciworld.jsonl"
    first = evaluate(tiny, sciworld, sci_tasks[:3], pool_size=2, max_steps=2, max_new_tokens=8, results_path=path)
    assert len(path.read_text().splitlines()) == 3
    with path.open("a") as f:
        f.write('{"adapter": "base", "env": "sciworld", "task_id"')  # a run killed mid-write
    tiny.calls.clear()
    again = evaluate(tiny, sciworld, sci_tasks[:5], pool_size=2, max_steps=2, max_new_tokens=8, results_path=path)
    assert sum(tiny.calls) == 2 * 2  # two new episodes of two steps each
    assert again[:3] == first and [r.task_id for r in again] == [t.task_id for t in sci_tasks[:5]]
    rows = [json.loads(line) for line in path.read_text().splitlines()[-2:]]
    assert [r["task_id"] for r in rows] == [t.task_id for t in sci_tasks[3:5]] and rows[0]["adapter"] == "base"
    tiny.calls.clear()
    assert evaluate(tiny, sciworld, sci_tasks[:5], max_steps=2, results_path=path) == again and not tiny.calls


def test_deliberating_agent(home, sci_tasks):
    with TransformersBackend(scripted_model(home / "scripted"), dtype="float32") as backend:
        records = evaluate(backend, sciworld, sci_tasks[:2], pool_size=2, max_steps=3, max_new_tokens=24)
    assert all(r.deliberation_steps == r.steps == 3 and r.format_errors == r.invalid_actions == 0 for r in records)
    [row] = summarize(records)
    assert row["deliberation_rate"] == 1.0 and row["invalid_action_rate"] == 0.0


@pytest.mark.parametrize("thought, expected", [
    ("Now I find a mug 1. Next, I need to take it.", False),
    ("I'll go to the agent's desk 1, it's nearby.", False),  # apostrophes are not quotes
    ("I could 'go to desk 1'.", False),  # one candidate
    ("Either \"go to desk 1\" or 'open drawer 2'; the drawer is closed, so the desk first.", True),
    ("Options:\n- go to desk 1\n- open drawer 2", True),
    ("1. go to desk 1: may hold the mug\n2) open drawer 2: closed", True),
    ("- go to desk 1\n- Go to desk 1.", False),  # the same candidate twice
    ("Let me compare going to the desk with opening the drawer.", True),
    ("It said \"the water in the pot is getting hot but it will take a long while to boil\", so \"wait\".",
     False),  # a quoted sentence is not an action
])
def test_is_deliberation(thought, expected):
    assert is_deliberation(thought) is expected


def test_summarize_math():
    def rec(env, split, reward, steps, **counts):
        base = {"format_errors": 0, "invalid_actions": 0, "deliberation_steps": 0, "prompt_tokens": 100,
                "completion_tokens": 10}
        return EpisodeRecord(env, split, "t", f"{env}{reward}{steps}", reward, reward >= 1, steps, **{**base, **counts})

    rows = summarize([
        rec("sciworld", "dev", 0.5, 10, deliberation_steps=4, format_errors=1, completion_tokens=30),
        rec("alfworld", "valid_seen", 1.0, 4, invalid_actions=2),
        rec("sciworld", "dev", 1.0, 20, deliberation_steps=2, format_errors=2),
        rec("alfworld", "valid_seen", 0.0, 0),
    ])
    assert rows == [
        {"env": "alfworld", "split": "valid_seen", "n": 2, "avg_reward": 50.0, "success_rate": 50.0,
         "per_step_reward": (1.0 / 4 + 0.0) / 2, "deliberation_rate": 0.0, "tokens_per_task": 110.0,
         "completion_tokens_per_task": 10.0, "format_error_rate": 0.0, "invalid_action_rate": 2 / 4},
        {"env": "sciworld", "split": "dev", "n": 2, "avg_reward": 75.0, "success_rate": 50.0,
         "per_step_reward": (0.5 / 10 + 1.0 / 20) / 2, "deliberation_rate": 6 / 30, "tokens_per_task": 120.0,
         "completion_tokens_per_task": 20.0, "format_error_rate": 3 / 30, "invalid_action_rate": 0.0},
    ]
