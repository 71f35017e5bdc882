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
    """ALFWorld game files: `ALFWORLD_DATA` (alfworld's own default: ~/.cache/alfworld), holding json_2.1.1/."""
    path = Path(os.environ.get("ALFWORLD_DATA", "~/.cache/alfworld")).expanduser().resolve()
    if not (path / "json_2.1.1").is_dir():
        from sand.errors import SandError

        raise SandError(f"no ALFWorld games at {path}/json_2.1.1: set ALFWORLD_DATA to the folder that holds "
                        "json_2.1.1/valid_seen and valid_unseen")
    return path


def import_limits() -> tuple[int, int]:
    """Largest importable file (bytes) and text field (characters): `SAND_IMPORT_MAX_MB` (default 100) and
    `SAND_IMPORT_MAX_FIELD_CHARS` (default 100000; an observation or reply is a few thousand at most)."""
    from sand.errors import SandError

    try:
        return (int(float(os.environ.get("SAND_IMPORT_MAX_MB", "100")) * 2**20),
                int(os.environ.get("SAND_IMPORT_MAX_FIELD_CHARS", "100000")))
    except ValueError as exc:
        raise SandError(f"SAND_IMPORT_MAX_MB / SAND_IMPORT_MAX_FIELD_CHARS must be numbers: {exc}") from None


DAGSTER_YAML = """\
# Written by sand on first use. Runs and event logs persist here.
telemetry:
  enabled: false
# No first-visit sign-up dialog over the UI.
nux:
  enabled: false
"""


def apply_defaults() -> None:
    """Environment the CLI and `dagster dev` share: SAND_HOME, and DAGSTER_HOME inside it."""
    os.environ.setdefault("SAND_HOME", str(Path(".sand_home").resolve()))
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(os.environ["SAND_HOME"]) / "dagster"))).resolve()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(DAGSTER_YAML)
