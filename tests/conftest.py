import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"

# The ALFWorld evaluation games sit beside the repository (never inside it).
os.environ.setdefault("ALFWORLD_DATA", str(REPO.parent / "shared" / "data" / "alfworld"))
# Tests share the cores with JVMs and each other: one torch thread avoids oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(items):
    """Modules that hold slow tests run first (the order is otherwise kept): the suite runs on one worker per core,
    a file at a time (pyproject's addopts), and a long file started last would run alone at the end."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


def replay(env, task, actions: list[str]):
    """Reset `env` to `task` and execute `actions`; the StepResult of the last one."""
    from sand.envs.base import StepResult

    result = StepResult(env.reset(task), env.score, False, True)
    for action in actions:
        result = env.step(action)
    return result


@pytest.fixture
def sand_home(tmp_path, monkeypatch):
    """A fresh SAND_HOME (and DAGSTER_HOME inside it) per test."""
    home = tmp_path / "sand_home"
    monkeypatch.setenv("SAND_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    return home


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One SAND_HOME for a whole test module (games, expert caches and tiny models are made once)."""
    with pytest.MonkeyPatch.context() as patch:
        home = tmp_path_factory.mktemp("sand_home")
        patch.setenv("SAND_HOME", str(home))
        yield home
