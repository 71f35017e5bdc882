"""Parsing what models reply, and the conversation shape shared by training and prompting."""
import pytest

from sand.react import conversation, history_window, parse_reply
from sand.trajectory import Step


@pytest.mark.parametrize("text, thought, action", [
    ("Thought: the mug is here.\nAction: take mug 1 from countertop 1", "the mug is here.", "take mug 1 from countertop 1"),
    ("Action: go to fridge 1", "", "go to fridge 1"),
    ("Thought: a\nmultiline plan\nAction: open fridge 1.\nObservation: The fridge is open.\nAction: look",
     "a\nmultiline plan", "open fridge 1"),
    ("**Action**: `go to desk 1`", "", "go to desk 1"),
    ("action:   [use desklamp 1]  ", "", "use desklamp 1"),
    ("Thought: first\nAction:\nAction: look around", "first", "look around"),
])
def test_parse_reply(text, thought, action):
    reply = parse_reply(text)
    assert (reply.thought, reply.action) == (thought, action)


@pytest.mark.parametrize("text", ["", "I think I should go to the fridge.", "Thought: hmm", "Action: ..."])
def test_parse_reply_format_errors(text):
    assert parse_reply(text).action is None


def test_conversation_alternates_and_can_end_at_the_assistant():
    steps = [Step("t", "go to a", "o1"), Step("", "look", "o2")]
    full = conversation("alfworld", "Your task is to: x", steps)
    assert [m["role"] for m in full] == ["user", "assistant", "user", "assistant", "user", "assistant", "user"]
    assert full[3]["content"] == "Thought: t\nAction: go to a" and full[5]["content"] == "Action: look"
    assert full[-1]["content"] == "Observation: o2"
    assert conversation("alfworld", "x", steps, final_observation=False)[-1]["role"] == "assistant"


@pytest.mark.parametrize("history", [1, 2, 5, 6, 8])
def test_history_window_is_bounded_and_prompts_extend_each_other_between_moves(history):
    steps = [Step(f"t{i}", f"a{i}", f"o{i}") for i in range(40)]
    windows = [history_window(steps[:n], history) for n in range(len(steps) + 1)]
    assert windows[:history + 1] == [steps[:n] for n in range(history + 1)]  # everything while it fits
    moves = 0
    for n, (before, window) in enumerate(zip(windows, windows[1:]), start=1):
        assert window == steps[n - len(window):n]  # the newest steps, in order
        assert history // 2 + 1 <= len(window) <= history or n <= history
        if window[:len(before)] != before:  # the prompt's prefix changed: the window moved
            moves += 1
    assert moves == (len(steps) - history - 1) // max(1, history // 2) + 1  # once a stride, not once a turn
    assert history_window(steps, None) == steps
