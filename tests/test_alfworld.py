"""ALFWorld with the real TextWorld/PDDL engine: generated games, real evaluation games, experts."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import replay

from sand import config
from sand.envs.alfworld import AlfWorldEnv
from sand.envs.alfworld_engine import TASK_TYPES, Engine, expert_cache_file, goal_library
from sand.envs.alfworld_expert import parse_goal
from sand.envs.alfworld_gen import ROOMS_FILE, build_room_templates, classic_grammar, generate_games
from sand.envs.base import StepResult, TaskSpec
from sand.errors import SandError
from sand.experts import record_expert


@pytest.fixture(scope="module")
def games(home):
    return generate_games(home / "train_games", 6, seed=1)


@pytest.fixture(scope="module")
def env(home, games):
    with AlfWorldEnv(train_games_dir=home / "train_games") as env:
        yield env


def test_generator_makes_every_task_type_in_the_real_folder_shape(games):
    assert len(games) == 6
    task_types = set()
    for folder in games:
        game = json.loads((folder / "game.tw-pddl").read_text())
        traj = json.loads((folder / "traj_data.json").read_text())
        assert set(game) == {"pddl_domain", "grammar", "pddl_problem", "solvable"} and game["solvable"] is True
        assert "UNKNOWN GOAL" not in game["grammar"] and '"put {o} in/on {r}"' in game["grammar"]
        assert set(traj["pddl_params"]) >= {"object_target", "parent_target", "toggle_target"}
        assert traj["task_id"] == folder.name
        task_types.add(traj["task_type"])
    assert task_types == set(TASK_TYPES)


def test_generator_is_idempotent_and_deterministic(home, games, tmp_path):
    stamps = [(f / "game.tw-pddl").stat().st_mtime_ns for f in games]
    assert generate_games(home / "train_games", 6, seed=1) == games
    assert [(f / "game.tw-pddl").stat().st_mtime_ns for f in games] == stamps
    [again] = generate_games(tmp_path, 1, seed=1)
    assert again.relative_to(tmp_path) == games[0].relative_to(home / "train_games")
    assert (again / "game.tw-pddl").read_bytes() == (games[0] / "game.tw-pddl").read_bytes()


@pytest.mark.parametrize("expert", ["observer", "planner"])
def test_every_generated_game_is_won_by_the_expert(home, games, expert):
    with AlfWorldEnv(train_games_dir=home / "train_games", expert=expert) as env:
        tasks = env.tasks("train")
        assert len(tasks) == 6
        # The planner plans each game at reset (up to a minute here): two games exercise its path.
        for task in tasks if expert == "observer" else tasks[:2]:
            trajectory = record_expert(env, task, expert)
            assert trajectory.reward == 1.0, (task.task_id, [s.action for s in trajectory.steps])
            assert len(trajectory.steps) <= 50


def test_observer_is_recomputed_identically_without_its_cache(env):
    task = env.tasks("train")[5]
    cached = env.expert_actions(task)
    expert_cache_file(env.game_dir(task), "observer").unlink()
    assert env.expert_actions(task) == cached


def test_observer_only_uses_the_classic_commands(env):
    actions = [a for task in env.tasks("train") for a in env.expert_actions(task)]
    assert any(re.fullmatch(r"put \w+ \d+ in/on \w+ \d+", a) for a in actions)
    assert all(re.match(r"(go to|open|take|put|clean|heat|cool|use|examine) ", a) for a in actions)


def test_generated_game_replay_is_deterministic(env):
    task = env.tasks("train")[0]
    intro = env.reset(task)
    assert intro.startswith("You are in the middle of a room.") and "\nYour task is to: " in intro
    prefix = env.expert_actions(task)[:2]
    live = [env.step(a) for a in prefix]
    assert live[0].observation.startswith("You arrive at loc ") and live[0].valid
    assert replay(env, task, prefix) == live[-1] == replay(env, task, prefix)


def test_real_splits_load_as_alfredtwenv_filters_them(env):
    assert len(env.tasks("valid_seen")) == 140
    assert len(env.tasks("valid_unseen")) == 134
    with pytest.raises(SandError, match="no split 'test'"):
        env.tasks("test")
    with AlfWorldEnv(games_per_split=3) as limited:
        assert limited.tasks("valid_unseen") == env.tasks("valid_unseen")[:3]


def test_real_valid_seen_game(env):
    task = env.tasks("valid_seen")[0]
    assert task.task in TASK_TYPES and task.split == "valid_seen"
    intro = env.reset(task)
    assert intro.startswith("You are in the middle of a room. Looking quickly around you, you see ")
    assert re.search(r"\nYour task is to: .+\.$", intro)
    admissible = env.admissible_actions()
    assert admissible and "look" in admissible
    wrong = env.step("fly to the moon")
    assert wrong == StepResult("Nothing happens.", 0.0, False, False)
    go = next(a for a in admissible if a.startswith("go to "))
    result = env.step(go)
    assert result.valid and result.observation.startswith("You arrive at loc ")
    assert replay(env, task, ["fly to the moon", go]) == result


def test_unplayable_game_and_missing_folder_name_the_game(env, tmp_path):
    split_root = env.split_root("valid_seen")
    unsolvable = next(p.parent for p in sorted(split_root.rglob("game.tw-pddl"))
                      if json.loads(p.read_text()).get("solvable") is False)
    engine = Engine()
    with pytest.raises(SandError, match=re.escape(str(unsolvable))):
        engine.reset(unsolvable, str(unsolvable))
    engine.close()
    with pytest.raises(SandError, match="nowhere/trial_x"):
        env.reset(TaskSpec("alfworld", "pick_and_place_simple", "nowhere/trial_x", "valid_seen"))
    with pytest.raises(SandError, match="expert 'oracle'"):
        AlfWorldEnv(expert="oracle")


def test_room_templates_are_built_from_a_split_folder(tmp_path):
    """One valid_seen game per room type, copied: each room is that one game's room, counted exactly."""
    seen = config.alfworld_data() / "json_2.1.1" / "valid_seen"
    split = tmp_path / "valid_seen"
    picked = {}
    for traj_file in sorted(seen.glob("*/*/traj_data.json")):
        room = json.loads(traj_file.read_text())["scene"]["scene_num"] // 100
        if (traj_file.parent / "game.tw-pddl").exists() and room not in picked:
            picked[room] = traj_file.parent
    for folder in picked.values():
        copy = split / folder.relative_to(seen)
        copy.mkdir(parents=True)
        for name in ("game.tw-pddl", "traj_data.json"):
            shutil.copy(folder / name, copy / name)
    templates = build_room_templates(split)
    assert set(templates) == {"comment", "capacity", "rooms"}
    assert "4 games of ALFWorld's valid_seen split only" in templates["comment"]
    assert set(templates["rooms"]) == {"Kitchen", "LivingRoom", "Bedroom", "Bathroom"}
    for room in templates["rooms"].values():
        assert set(room) == {"receptacles", "objects"} and room["objects"]
        for share, low, mode, high in [*room["receptacles"].values(), *room["objects"].values()]:
            assert share == 1.0 and 1 <= low == mode == high
        assert all(templates["capacity"][r] > 0 for r in room["receptacles"])
    kitchen = json.loads((picked[0] / "game.tw-pddl").read_text())["pddl_problem"]
    assert templates["rooms"]["Kitchen"]["receptacles"]["StoveBurner"][1] == kitchen.count("StoveBurnerType)")
    with pytest.raises(SandError, match="held-out unseen"):
        build_room_templates(tmp_path / "valid_unseen")


def test_room_templates_are_rebuilt_from_valid_seen_only():
    """rooms.json is exactly what the builder makes from valid_seen: no hand edits, no valid_unseen."""
    seen = config.alfworld_data() / "json_2.1.1" / "valid_seen"
    assert json.loads(ROOMS_FILE.read_text()) == build_room_templates(seen)


def test_classic_grammar_is_the_one_real_games_embed(env):
    real = json.loads((env.game_dir(env.tasks("valid_seen")[0]) / "game.tw-pddl").read_text())["grammar"]
    goal = re.search(r"Your task is to: (.*)\.", real).group(1)
    assert classic_grammar().replace("UNKNOWN GOAL", goal) == real


def test_goal_parser_reads_every_alfworld_goal_template():
    for task_type in TASK_TYPES:
        for template in goal_library.gdict[task_type]["templates"]:
            sentence = template.format(obj="apple", recep="fridge", toggle="desklamp")
            goal = parse_goal(f"Your task is to: {sentence}.")
            assert goal.task_type == task_type and goal.obj == "apple"


def test_importing_the_env_leaves_alfworld_data_unset():
    code = "import os, sand.envs.alfworld; assert 'ALFWORLD_DATA' not in os.environ"
    environ = {k: v for k, v in os.environ.items() if k != "ALFWORLD_DATA"}
    subprocess.run([sys.executable, "-c", code], env=environ, check=True, cwd=Path(__file__).parents[1])
