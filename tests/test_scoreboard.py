"""The per-experiment scoreboard asset on a real Dagster instance and a real catalog: the table with intervals,
the chart (a real PNG under SAND_HOME, embedded in the markdown the UI renders) and numeric metadata."""
import base64
import re

from dagster import AssetKey, instance_for_test, materialize

from resources import StoreResource
from sand.experiment import Experiment, SandConfig
from sand.report import record_uncertainty
from sand.store import Lineage, Store
from sand_assets.scoreboard import build_scoreboard_asset, evaluation_keys
from tests.test_report import episodes

PNG = b"\x89PNG\r\n\x1a\n"


def evaluate(store, agent, iteration, rewards, deliberating=0):
    rows = [{"env": "alfworld", "split": "valid_seen", "task_id": f"a{i}", "reward": r, "steps": 10,
             "deliberation_steps": deliberating} for i, r in enumerate(rewards)]
    store.write("evaluations", f"exp/{agent}", episodes(agent, iteration, *rows), Lineage(asset="test"))
    record_uncertainty(store, "exp", agent, Lineage(asset="test"))


def test_scoreboard_shows_agents_with_intervals_chart_and_plottable_metadata(sand_home):
    exp = Experiment(name="exp", sand=SandConfig(iterations=1))
    board = build_scoreboard_asset(exp)
    assert set(board.dependency_keys) == {AssetKey(["exp", "base_evaluation"]), *evaluation_keys(exp)[1:]}
    store = Store(sand_home)
    evaluate(store, "base", None, [0, 0, 0, 1])
    evaluate(store, "sft", 0, [1, 0, 1, 0])
    resources = {"store": StoreResource(home=str(sand_home))}

    with instance_for_test() as instance:
        def run():
            result = materialize([board], resources=resources, instance=instance)
            [event] = result.get_asset_materialization_events()
            return event.materialization

        first = run()
        meta = first.metadata
        assert meta["sft/alfworld/valid_seen/avg_reward"].value == 50.0
        assert meta["base/alfworld/valid_seen/avg_reward"].value == 25.0
        lo, hi = meta["sft/alfworld/valid_seen/ci_lo"].value, meta["sft/alfworld/valid_seen/ci_hi"].value
        assert 0 <= lo < 50.0 < hi <= 100
        markdown = meta["scoreboard"].value
        table = [line for line in markdown.splitlines() if line.startswith("| sft ")][0]
        assert f"50.0 [{lo}, {hi}]" in table and "| agent | alfworld/valid_seen |" in markdown
        image = base64.b64decode(re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown).group(1))
        chart = meta["chart"].value
        assert image.startswith(PNG) and open(chart, "rb").read() == image
        assert chart.startswith(str(sand_home / "reports" / "exp"))
        assert "## against sft" in markdown  # the base model against SFT: -25.0 on the same four tasks
        assert [line for line in markdown.splitlines() if line.startswith("| base ")][1].split("|")[2].strip() \
            .startswith("-25.0 [")
        assert "sft vs base: +25.0 [" in markdown.split("## paired comparisons over all tasks")[1]  # rewards
        assert run().tags["dagster/data_version"] == first.tags["dagster/data_version"]  # same evaluations

        # A SAND iteration lands: a new row, its comparison with SFT, its deliberation rate.
        evaluate(store, "iter_1", 1, [1, 1, 1, 0], deliberating=5)
        second = run()
        assert second.tags["dagster/data_version"] != first.tags["dagster/data_version"]
        assert second.metadata["iter_1/alfworld/valid_seen/avg_reward"].value == 75.0
        assert second.metadata["iter_1/alfworld/valid_seen/deliberation_rate"].value == 0.5
        assert second.metadata["chart"].value != chart
        assert any(line.startswith("| iter_1 ") and "25.0 [" in line
                   for line in second.metadata["scoreboard"].value.splitlines())


def test_an_experiment_without_evaluations_says_so(sand_home):
    board = build_scoreboard_asset(Experiment(name="exp"))
    with instance_for_test() as instance:
        result = materialize([board], resources={"store": StoreResource(home=str(sand_home))}, instance=instance)
        [event] = result.get_asset_materialization_events()
        assert event.materialization.metadata["scoreboard"].value == "exp: no evaluations yet"
