"""ReAct turns: the conversation the agent is trained on and prompted with, and parsing its replies.

The conversation has the ETO shape: the environment's instruction prompt, "OK", the task, then
assistant turns `Thought: ...\\nAction: ...` and user turns `Observation: ...`. Training data and
agent prompts are built by the same function, so what the agent sees at test time is what it was
tuned on.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from sand import prompts
from sand.trajectory import Step

# A reply ends at its action line; models go on to invent the observation (the parser reads the first action).
REPLY_STOP = ("\nObservation",)
_ACTION = re.compile(r"^[ \t]*\**Action\**[ \t]*:[ \t]*(.*?)[ \t]*$", re.MULTILINE | re.IGNORECASE)
_THOUGHT = re.compile(r"^\s*\**Thought\**\s*:\s*(.*?)\s*(?=^\s*\**Action\**\s*:|\Z)",
                      re.MULTILINE | re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class Reply:
    thought: str
    action: str | None  # None: the reply has no usable action line (a format error)


def parse_reply(text: str) -> Reply:
    """The thought and action of a model reply, tolerant of what small models emit.

    Takes the first non-empty `Action:` line (models often keep going and invent the next turns),
    strips surrounding quotes, brackets and a trailing period.
    """
    thought_match = _THOUGHT.search(text)
    thought = thought_match.group(1).strip() if thought_match else ""
    for candidate in _ACTION.findall(text):
        action = candidate.strip().strip("`'\"[]<>").rstrip(".").strip()
        if action:
            return Reply(thought, action)
    return Reply(thought, None)


def assistant_turn(step: Step) -> str:
    return f"Thought: {step.thought}\nAction: {step.action}" if step.thought else f"Action: {step.action}"


HEADER_TURNS = 3  # the instruction prompt, "OK" and the task open every conversation


def conversation(env: str, instruction: str, steps: list[Step], final_observation: bool = True) -> list[dict]:
    """Chat messages for an episode so far. Without `final_observation`, the last step's
    observation is left out (training targets end at the assistant turn)."""
    messages = [
        {"role": "user", "content": prompts.instruction(env)},
        {"role": "assistant", "content": "OK"},
        {"role": "user", "content": instruction},
    ]
    for i, step in enumerate(steps):
        messages.append({"role": "assistant", "content": assistant_turn(step)})
        if final_observation or i < len(steps) - 1:
            messages.append({"role": "user", "content": f"Observation: {step.observation}"})
    return messages
