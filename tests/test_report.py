"""The paper's metrics as the catalog computes them (`evaluation_summary`), and the scoreboard built on them."""
import polars as pl
import pytest

from sand.cli import main
from sand.report import scoreboard
from sand.store import Lineage, Store


def episodes(agent, iteration, *rows):
    base = {"experiment": "exp", "agent": agent, "iteration": iteration, "checkpoint": None, "task": "t",
            "format_errors": 0, "invalid_actions": 0, "deliberation_steps": 0, "prompt_tokens": 100,
            "completion_tokens": 10}
    return pl.DataFrame([{**base, "task_id": f"{r['env']}{i}", "success": r["reward"] >= 1, **r}
                         for i, r in enumerate(rows)])


@pytest.fixture
def store(sand_home):
    store = Store()
    store.write("evaluations", "exp/sft", episodes(
        "sft", 0,
        {"env": "sciworld", "split": "dev", "reward": 0.5, "steps": 10, "deliberation_steps": 4, "format_errors": 1,
         "completion_tokens": 30},
        {"env": "alfworld", "split": "valid_seen", "reward": 1.0, "steps": 4, "invalid_actions": 2},
        {"env": "sciworld", "split": "dev", "reward": 1.0, "steps": 20, "deliberation_steps": 2, "format_errors": 2},
        {"env": "alfworld", "split": "valid_seen", "reward": 0.0, "steps": 0}), Lineage(asset="test"))
    store.write("evaluations", "exp/base", episodes(
        "base", None,
        {"env": "sciworld", "split": "dev", "reward": 0.0, "steps": 10, "format_errors": 10},
        {"env": "alfworld", "split": "valid_seen", "reward": 0.0, "steps": 10, "format_errors": 10}),
        Lineage(asset="test"))
    return store


def test_summary_view_computes_the_papers_metrics(store):
    rows = store.sql("select * exclude (experiment, checkpoint) from evaluation_summary where agent = 'sft' "
                     "order by env").to_dicts()
    assert rows == [
        {"agent": "sft", "iteration": 0, "env": "alfworld", "split": "valid_seen", "episodes": 2, "avg_reward": 50.0,
         "success_rate": 50.0, "per_step_reward": round((1.0 / 4 + 0.0) / 2, 4), "deliberation_rate": 0.0,
         "tokens_per_task": 110.0, "format_error_rate": 0.0, "invalid_action_rate": 0.5},
        {"agent": "sft", "iteration": 0, "env": "sciworld", "split": "dev", "episodes": 2, "avg_reward": 75.0,
         "success_rate": 50.0, "per_step_reward": round((0.5 / 10 + 1.0 / 20) / 2, 4), "deliberation_rate": 0.2,
         "tokens_per_task": 120.0, "format_error_rate": 0.1, "invalid_action_rate": 0.0},
    ]


def test_scoreboard_has_one_row_per_agent_in_training_order(store, capsys):
    table = scoreboard(store, "exp")
    assert table.columns == ["agent", "alfworld/valid_seen", "sciworld/dev", "mean"]
    assert table.rows() == [("base", 0.0, 0.0, 0.0), ("sft", 50.0, 75.0, 62.5)]
    assert scoreboard(store, "exp", "format_error_rate")["mean"].to_list() == [1.0, 0.05]
    assert scoreboard(store, "other").is_empty()
    with pytest.raises(ValueError, match="unknown metric"):
        scoreboard(store, "exp", "accuracy")
    main(["report", "exp"])
    out = capsys.readouterr().out
    assert "alfworld/valid_seen (2 episodes)" in out and "| sft   | 50.0" in out
