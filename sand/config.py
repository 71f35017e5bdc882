"""Where the platform keeps what it writes, and where it finds external game data."""
from __future__ import annotations

import os
from pathlib import Path


def sand_home() -> Path:
    """Root of everything runs write: datasets, catalog, checkpoints, caches. `SAND_HOME` or ./.sand_home."""
    home = Path(os.environ.get("SAND_HOME", ".sand_home")).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def cache_dir(*parts: str) -> Path:
    """A cache folder under SAND_HOME (expert walkthroughs, converted models, generated games)."""
    path = sand_home().joinpath("cache", *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def alfworld_data() -> Path:
    """ALFWorld game files (`json_2.1.1/valid_seen`, `valid_unseen`): `ALFWORLD_DATA`."""
    value = os.environ.get("ALFWORLD_DATA")
    if not value:
        from sand.errors import SandError

        raise SandError("ALFWORLD_DATA is not set: point it at the folder holding json_2.1.1/ "
                        "(in this repository's CI: ../shared/data/alfworld)")
    return Path(value).expanduser().resolve()
