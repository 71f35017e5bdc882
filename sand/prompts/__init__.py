"""Prompt templates live in files beside this module (data files of it: part of the code version of any work
that imports it, see sand.versioning)."""
from __future__ import annotations

from functools import cache
from pathlib import Path

PROMPTS_DIR = Path(__file__).parent


@cache
def load(name: str) -> str:
    return (PROMPTS_DIR / f"{name}.txt").read_text()


def instruction(env: str) -> str:
    """The environment's ReAct instruction prompt (turn 0 of an ETO conversation)."""
    return load(f"{env}_instruction").strip()

