"""Parsing what models reply, and the conversation shape shared by training and prompting."""
import pytest

from sand.react import conversation, parse_reply
from sand.trajectory import Step


@pytest.mark.parametrize("text, thought, action", [
    ("Thought: the mug is here.\nAction: take mug 1 from countertop 1", "the mug is here.",
     "take mug 1 from countertop 1"),
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
