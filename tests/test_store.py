"""The Parquet store and the DuckDB catalog, on a real DuckDB file."""
import duckdb
import polars as pl
import pytest

from sand.errors import SandError
from sand.schemas import TABLES
from sand.store import DatasetRef, Lineage, Store
from sand.trajectory import Step, Trajectory, to_frame


def traj(tid: str, env: str = "alfworld", n: int = 2, reward: float | None = 1.0) -> Trajectory:
    steps = [Step(thought=f"t{i}", action=f"go to shelf {i}", observation=f"obs {i}") for i in range(n)]
    return Trajectory(tid, env, "pick_and_place_simple", f"game/{tid}", "train", "observer", "Your task is to: x",
                      steps, reward)


def test_write_is_versioned_by_content_and_idempotent(sand_home):
    store = Store()
    first = store.write("trajectories", "expert", to_frame([traj("a"), traj("b")]), Lineage(asset="test"))
    again = store.write("trajectories", "expert", to_frame([traj("b"), traj("a")]), Lineage(asset="test"))
    assert first.created and not again.created
    assert again.ref.version == first.ref.version  # row order does not change the version
    changed = store.write("trajectories", "expert", to_frame([traj("a")]), Lineage(asset="test"))
    assert changed.ref.version != first.ref.version
    assert first.path.exists() and changed.path.exists()  # the old version stays on disk
    assert store.head("trajectories", "expert") == changed.ref
    assert store.read("trajectories", "expert", first.ref.version).height == 2
    assert store.read("trajectories", "expert").height == 1


def test_catalog_views_show_current_versions_steps_and_lineage(sand_home):
    store = Store()
    store.write("trajectories", "expert", to_frame([traj("a"), traj("b", env="sciworld", n=3)]), Lineage(asset="x"))
    src = store.write("source_trajectories", "alfworld", to_frame([traj("a")]), Lineage(asset="src"))
    store.write("trajectories", "expert", to_frame([traj("a"), traj("b", env="sciworld", n=3), traj("c")]),
                Lineage(asset="x", run_id="r1", inputs=[src.ref], iteration=0))
    counts = dict(store.sql("select env, count(*) from trajectories group by env").iter_rows())
    assert counts == {"alfworld": 2, "sciworld": 1}
    assert store.sql("select count(*) from trajectories_all").item() == 5  # both versions kept
    steps = store.sql("select trajectory_id, step, action from steps where trajectory_id = 'b' order by step")
    assert steps["step"].to_list() == [0, 1, 2] and steps["action"][2] == "go to shelf 2"
    lineage = store.sql("select asset, iteration, run_id, inputs from lineage where run_id = 'r1'")
    assert lineage.height == 1 and lineage["iteration"][0] == 0
    assert lineage["inputs"][0][0] == {"table": "source_trajectories", "dataset": "alfworld",
                                       "version": src.ref.version}
    # The catalog file opens in plain DuckDB too, with the views declared.
    con = duckdb.connect(str(store.catalog_path), read_only=True)
    assert con.execute("select count(*) from steps").fetchone()[0] == 2 + 3 + 2  # a, b, c of the current expert version
    con.close()


def test_views_work_before_any_data(sand_home):
    store = Store()
    assert store.sql("select count(*) from trajectories").item() == 0
    assert store.sql("select count(*) from lineage").item() == 0
    assert store.sql("select * from steps").columns[:5] == ["trajectory_id", "dataset", "version", "env", "step"]


def test_bad_rows_are_rejected_and_nothing_is_written(sand_home):
    store = Store()
    with pytest.raises(SandError, match="lack columns"):
        store.write("trajectories", "expert", pl.DataFrame({"id": ["a"]}), Lineage(asset="x"))
    with pytest.raises(SandError, match="unknown table"):
        store.write("nope", "expert", to_frame([traj("a")]), Lineage(asset="x"))
    assert store.head("trajectories", "expert") is None
    assert not list((sand_home / "datasets" / "trajectories").glob("expert*"))
    with pytest.raises(SandError, match="SQL error"):
        store.sql("select * from no_such_view")


def test_dataset_names_with_slashes(sand_home):
    store = Store()
    store.write("source_trajectories", "import/my file", to_frame([traj("a")]), Lineage(asset="x"))
    assert store.datasets("source_trajectories") == [
        DatasetRef("source_trajectories", "import/my file",
                   store.head("source_trajectories", "import/my file").version)]


def test_a_version_stored_before_a_column_existed_reads_it_as_null(sand_home):
    store = Store()
    written = store.write("trajectories", "old", to_frame([traj("a")]), Lineage(asset="test"))
    # The file as an older release wrote it: without the columns added since.
    pl.read_parquet(written.path).drop("resolution", "replay", "diverged_at").write_parquet(written.path)
    rows = store.read("trajectories", "old")
    assert rows["id"].to_list() == ["a"] and rows["resolution"].to_list() == [None]
    assert rows.columns == list(TABLES["trajectories"])
