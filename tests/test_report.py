"""The paper's metrics as the catalog computes them (`evaluation_summary`), the intervals and paired comparisons
beside them (`agent_comparison`), and the scoreboard and report built on them."""
import polars as pl
import pytest

from jobs.cli import main
from sand.errors import SandError
from sand.report import comparisons, record_uncertainty, scoreboard
from sand.stats import bootstrap_ci, paired_comparison
from sand.store import Lineage, Store


def episodes(agent, iteration, *rows):
    base = {"experiment": "exp", "agent": agent, "iteration": iteration, "checkpoint": None, "task": "t",
            "format_errors": 0, "invalid_actions": 0, "max_invalid_streak": 10, "invalid_cutoff": False,
            "deliberation_steps": 0, "prompt_tokens": 100, "completion_tokens": 10, "transcript": []}
    return pl.DataFrame([{**base, "task_id": r.get("task_id", f"{r['env']}{i}"), "success": r["reward"] >= 1, **r}
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
    store.write("evaluations", "exp/base", episodes(  # the same four tasks
        "base", None, *({"env": env, "split": split, "task_id": f"{env}{i}", "reward": 0.0, "steps": 10,
                         "format_errors": 10}
                        for i, (env, split) in enumerate([("sciworld", "dev"), ("alfworld", "valid_seen")] * 2))),
        Lineage(asset="test"))
    return store


def test_summary_view_computes_the_papers_metrics(store):
    rows = store.sql("select * exclude (experiment, checkpoint) from evaluation_summary where agent = 'sft' "
                     "order by env").to_dicts()
    assert rows == [
        {"agent": "sft", "iteration": 0, "env": "alfworld", "split": "valid_seen", "episodes": 2, "avg_reward": 50.0,
         "success_rate": 50.0, "per_step_reward": round((1.0 / 4 + 0.0) / 2, 4), "deliberation_rate": 0.0,
         "tokens_per_task": 110.0, "format_error_rate": 0.0, "invalid_action_rate": 0.5, "ci_lo": None,
         "ci_hi": None},
        {"agent": "sft", "iteration": 0, "env": "sciworld", "split": "dev", "episodes": 2, "avg_reward": 75.0,
         "success_rate": 50.0, "per_step_reward": round((0.5 / 10 + 1.0 / 20) / 2, 4), "deliberation_rate": 0.2,
         "tokens_per_task": 120.0, "format_error_rate": 0.1, "invalid_action_rate": 0.0, "ci_lo": None,
         "ci_hi": None},
    ]  # no interval recorded for these episodes yet


def test_recorded_uncertainty_is_in_the_catalog_and_follows_the_current_evaluations(store):
    metadata = record_uncertainty(store, "exp", "sft", Lineage(asset="test"))
    dev = bootstrap_ci([0.5, 1.0])  # sciworld0, sciworld2 in task-id order
    assert metadata["sciworld/dev/avg_reward"] == 75.0 and metadata["sciworld/dev/episodes"] == 2
    assert (metadata["sciworld/dev/ci_lo"], metadata["sciworld/dev/ci_hi"]) == (round(100 * dev.lo, 1),
                                                                                round(100 * dev.hi, 1))
    assert set(metadata) == {f"{s}/{m}" for s in ("alfworld/valid_seen", "sciworld/dev")
                             for m in ("avg_reward", "ci_lo", "ci_hi", "episodes")}
    summary = store.sql("select env, ci_lo, ci_hi from evaluation_summary where agent = 'sft' order by env")
    assert summary.row(1) == ("sciworld", round(100 * dev.lo, 1), round(100 * dev.hi, 1))
    # Both directions of the pair, whichever agent recorded it.
    pairs = store.sql("select agent, baseline, env, n, mean_diff, won, lost, tied from agent_comparison "
                      "order by agent, env").rows()
    assert pairs == [("base", "sft", "alfworld", 2, -50.0, 0, 1, 1), ("base", "sft", "sciworld", 2, -75.0, 0, 2, 0),
                     ("sft", "base", "alfworld", 2, 50.0, 1, 0, 1), ("sft", "base", "sciworld", 2, 75.0, 2, 0, 0)]
    record_uncertainty(store, "exp", "base", Lineage(asset="test"))  # the same pairs again: shown once
    assert store.sql("select count(*) from agent_comparison").item() == 4
    # Re-evaluated base: the stored pairs no longer describe current evaluations and drop out of the view;
    # base's interval is gone from the summary until it is recorded again.
    store.write("evaluations", "exp/base", episodes(
        "base", None, {"env": "sciworld", "split": "dev", "task_id": "sciworld0", "reward": 0.5, "steps": 3},
        {"env": "alfworld", "split": "valid_seen", "task_id": "alfworld1", "reward": 1.0, "steps": 3}),
        Lineage(asset="test"))
    assert store.sql("select count(*) from agent_comparison").item() == 0
    assert store.sql("select ci_lo from evaluation_summary where agent = 'base'")["ci_lo"].to_list() == [None, None]
    record_uncertainty(store, "exp", "base", Lineage(asset="test"))
    assert store.sql("select n, mean_diff from agent_comparison where agent = 'sft' and env = 'sciworld'").row(0) \
        == (1, 0.0)  # the one task both were evaluated on: sciworld0, 0.5 each


def test_scoreboard_and_comparisons(store):
    board = scoreboard(store, "exp")
    assert board.columns == ["agent", "iteration", "env", "split", "episodes", "avg_reward", "ci_lo", "ci_hi",
                             "success_rate", "format_error_rate", "deliberation_rate", "tokens_per_task"]
    assert board.select("agent", "env", "avg_reward").rows() == [
        ("base", "alfworld", 0.0), ("base", "sciworld", 0.0), ("sft", "alfworld", 50.0), ("sft", "sciworld", 75.0)]
    alf = bootstrap_ci([1.0, 0.0])
    assert board.row(2, named=True)["ci_lo"] == round(100 * alf.lo, 1)
    assert board.row(2, named=True)["ci_hi"] == round(100 * alf.hi, 1)
    assert board["ci_lo"].to_list()[:2] == [0.0, 0.0] and board["ci_hi"].to_list()[:2] == [0.0, 0.0]
    table = comparisons(store, "exp", baseline="base")
    assert table.select("agent", "env", "n", "mean_diff", "won", "lost", "tied").rows() == [
        ("sft", "alfworld", 2, 50.0, 1, 0, 1), ("sft", "sciworld", 2, 75.0, 2, 0, 0)]
    p = paired_comparison({"a": 0.5, "b": 1.0}, {"a": 0.0, "b": 0.0})
    assert table.row(1, named=True)["lo"] == round(100 * p.lo, 1)
    assert comparisons(store, "exp")["agent"].to_list() == ["base", "base"]  # against sft by default
    assert scoreboard(store, "other").is_empty() and comparisons(store, "other").is_empty()
    with pytest.raises(SandError, match="no evaluations of agent 'iter_1'.*evaluated: base, sft"):
        comparisons(store, "exp", baseline="iter_1")


def test_report_prints_intervals_and_one_line_per_comparison(store, capsys):
    main(["report", "exp"])
    out = capsys.readouterr().out
    assert "alfworld/valid_seen (2 episodes)" in out
    board = scoreboard(store, "exp").filter(agent="sft", env="sciworld").row(0, named=True)
    assert f"| sft   | 50.0 [{board['ci_lo']}, {board['ci_hi']}]" in out.replace("  ", " ") or \
        f"75.0 [{board['ci_lo']}, {board['ci_hi']}]" in out
    last = out.strip().splitlines()[-1]
    p = paired_comparison({"a": 1.0, "b": 0.0, "c": 0.5, "d": 1.0}, {"a": 0.0, "b": 0.0, "c": 0.0, "d": 0.0})
    assert last == (f"sft vs base: +62.5 [{100 * p.lo:+.1f}, {100 * p.hi:+.1f}] (4 tasks, won/lost/tied 3/0/1)")
    # Before the rewards, the same comparison of each episode's share of steps: base's replies never had an
    # action; sft's had one at 90% / 100% / 90% / 100% of its episodes' steps, accepted at 90% / 50% / 90% / 100%.
    lines = out.strip().splitlines()
    formed = lines[lines.index("share of steps x100 with replies with an action, paired:") + 1]
    accepted = lines[lines.index("share of steps x100 with actions the environment accepted, paired:") + 1]
    assert formed.startswith("sft vs base: +95.0 [") and formed.endswith("(4 tasks, won/lost/tied 4/0/0)")
    assert accepted.startswith("sft vs base: +82.5 [") and accepted.endswith("(4 tasks, won/lost/tied 4/0/0)")
    main(["report", "exp", "--vs", "sft"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("base vs sft: -62.5 [")
    with pytest.raises(SystemExit):
        main(["report", "exp", "--vs", "iter_2"])
    assert "no evaluations of 'iter_2'" in capsys.readouterr().err
