"""Prompt templates live in files beside this module; their hash is part of asset code versions."""
from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

PROMPTS_DIR = Path(__file__).parent


@cache
def load(name: str) -> str:
    return (PROMPTS_DIR / f"{name}.txt").read_text()


def instruction(env: str) -> str:
    """The environment's ReAct instruction prompt (turn 0 of an ETO conversation)."""
    return load(f"{env}_instruction").strip()


def templates_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(PROMPTS_DIR.glob("*.txt")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]
