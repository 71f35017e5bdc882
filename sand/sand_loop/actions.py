"""Action normalisation: when two sampled actions count as the same action.

Used to de-duplicate candidates, to key rollouts and critiques, and to check that a synthesised
thought names an action. The canonical form is also a valid command: ALFWorld's "put X in/on Y" is
the engine's own wording, so a rollout can execute a normalised candidate as is.
"""
from __future__ import annotations

import re

_NOISE = re.compile(r"[\"'`“”‘’!?;,]")  # quotes and sentence punctuation never belong to an action
_EDGES = " .:*[]()<>"  # what models wrap around an action or leave at its end
# ALFWorld objects are one word and a number ("mug 1"), so the pattern also works inside a sentence.
_ALFWORLD_PUT = re.compile(r"\bput (\w+(?: \d+)?) (?:in/on|in|on|into|onto) ")


def normalize(action: str, env: str | None = None) -> str:
    """Lowercase, without quotes and punctuation, whitespace collapsed; ALFWorld "put X in Y" and
    "put X on Y" become the engine's "put X in/on Y"."""
    text = " ".join(_NOISE.sub(" ", action.lower()).split()).strip(_EDGES)
    if env == "alfworld":
        text = _ALFWORLD_PUT.sub(r"put \1 in/on ", text)
    return text


def mentions(text: str, action: str, env: str | None = None) -> bool:
    """Whether `text` names `action` (both normalised; whole words, so "desk 1" is not in "desk 10")."""
    return re.search(rf"(?<![\w/]){re.escape(normalize(action, env))}(?![\w/])", normalize(text, env)) is not None
