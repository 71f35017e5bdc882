"""Code versions derived from source, so a changed module changes the assets built from it."""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from sand.prompts import templates_hash


def code_version(*modules: str, prompts: bool = False) -> str:
    """Hash of the named modules' source files (and the prompt templates when they matter)."""
    digest = hashlib.sha256()
    for name in sorted(modules):
        origin = importlib.util.find_spec(name).origin
        digest.update(name.encode() + b"\0" + Path(origin).read_bytes())
    if prompts:
        digest.update(templates_hash().encode())
    return digest.hexdigest()[:12]
