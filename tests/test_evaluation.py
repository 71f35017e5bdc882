"""The evaluation harness on real ALFWorld games and ScienceWorld variations with real tiny models."""
import pytest
import torch
from test_rollout import SCI_TASKS, CountingBackend, scripted_model

from sand.envs.alfworld import AlfWorldEnv
from sand.envs.sciworld import ScienceWorldEnv
from sand.errors import SandError
from sand.evaluation import evaluate, is_deliberation
from sand.models import tiny_model
from sand.models.backends import TransformersBackend
from sand.rollout import FORMAT_ERROR
from sand.worklog import WorkLog

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
        # The transcript keeps each reply; none held an action, so the environment never moved.
        assert len(r.transcript) == 3 and all(s["reply"] and (s["action"], s["observation"], s["valid"]) ==
                                              ("", FORMAT_ERROR, False) for s in r.transcript)
    assert [(r.env, r.split) for r in records] == [("alfworld", "valid_seen")] * 2 + [("sciworld", "dev")] * 2


def test_rerun_skips_recorded_episodes(home, tiny, sci_tasks, tmp_path):
    log = WorkLog(tmp_path / "work" / "sciworld")
    first = evaluate(tiny, sciworld, sci_tasks[:3], pool_size=2, max_steps=2, max_new_tokens=8, log=log)
    assert log.frame().height == 3
    (log.folder / ".part-000003.parquet.0123.tmp").write_bytes(b"PAR1")  # a run killed mid-write
    tiny.calls.clear()
    again = evaluate(tiny, sciworld, sci_tasks[:5], pool_size=2, max_steps=2, max_new_tokens=8, log=log)
    assert sum(tiny.calls) == 2 * 2  # two new episodes of two steps each
    assert again[:3] == first and [r.task_id for r in again] == [t.task_id for t in sci_tasks[:5]]
    rows = log.frame().tail(2)
    assert rows["task_id"].to_list() == [t.task_id for t in sci_tasks[3:5]] and set(rows["adapter"]) == {"base"}
    tiny.calls.clear()
    assert evaluate(tiny, sciworld, sci_tasks[:5], max_steps=2, log=log) == again and not tiny.calls


def test_deliberating_agent(home, sci_tasks):
    with TransformersBackend(scripted_model(home / "scripted"), dtype="float32") as backend:
        records = evaluate(backend, sciworld, sci_tasks[:2], pool_size=2, max_steps=3, max_new_tokens=24)
    assert all(r.deliberation_steps == r.steps == 3 and r.format_errors == r.invalid_actions == 0 for r in records)


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


def test_consecutive_invalid_actions_end_the_episode(home, sci_tasks):
    # An agent that always answers with an action ScienceWorld's parser rejects.
    with TransformersBackend(scripted_model(home / "invalid", "Thought: hmm.\n  Action : fly away"),
                             dtype="float32") as backend:
        cut = evaluate(backend, sciworld, sci_tasks[:2], pool_size=2, max_steps=8, max_new_tokens=16,
                       max_invalid_streak=3)
        uncut = evaluate(backend, sciworld, sci_tasks[:1], pool_size=1, max_steps=5, max_new_tokens=16,
                         max_invalid_streak=None)
    for r in cut:
        assert (r.steps, r.invalid_actions, r.format_errors, r.invalid_cutoff, r.max_invalid_streak) == \
            (3, 3, 0, True, 3)
        assert [(s["thought"], s["action"], s["valid"]) for s in r.transcript] == [("hmm.", "fly away", False)] * 3
        assert all("fly away" in s["reply"] and s["observation"] and s["score"] == 0.0 for s in r.transcript)
    assert (uncut[0].steps, uncut[0].invalid_actions, uncut[0].invalid_cutoff, uncut[0].max_invalid_streak) == \
        (5, 5, False, None)


def test_per_task_step_caps(home, tiny, sci_tasks):
    tasks = [sci_tasks[0], sci_tasks[-1]]  # two task types
    assert tasks[0].task != tasks[1].task
    records = evaluate(tiny, sciworld, tasks, pool_size=2, max_steps=4, max_new_tokens=8,
                       task_max_steps={tasks[0].task: 2})
    assert [r.steps for r in records] == [2, 4]
    with pytest.raises(SandError, match="task_max_steps names task types that are not evaluated: boil"):
        evaluate(tiny, sciworld, tasks, task_max_steps={"boil": 5, tasks[0].task: 2})
