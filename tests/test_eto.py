"""ETO/ShareGPT import and export: validation that names the record and field, and round trips."""
import json
import subprocess
import sys

import pytest

from sand import datasets
from sand.errors import ValidationError
from sand.formats import eto
from sand.store import Lineage, Store
from tests.conftest import DATA

SAMPLE = DATA / "eto_alfworld_sample.json"


def test_parse_sample():
    trajs = eto.load_eto(SAMPLE, "alfworld")
    assert [t.id for t in trajs] == ["alfworld_demo_0", "alfworld_demo_1"]
    first = trajs[0]
    assert first.task == "pick_clean_then_place_in_recep"
    assert trajs[1].task == "look_at_obj_in_light"
    assert first.instruction.endswith("put a clean mug in cabinet 1.")
    assert len(first.steps) == 6
    assert first.steps[0].thought == "A mug is often on the countertop."
    assert first.steps[0].action == "go to countertop 1"
    assert first.steps[0].observation == "On the countertop 1, you see a mug 1."
    assert first.steps[2].thought == "" and first.steps[2].action == "go to sinkbasin 1"
    assert first.reward is None and trajs[1].reward == 1.0


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_round_trip(tmp_path, suffix):
    original = eto.load_eto(SAMPLE, "alfworld")
    path = eto.write_eto(original, tmp_path / f"out{suffix}")
    again = eto.load_eto(path, "alfworld")
    assert again == original
    record = json.loads(path.read_text().splitlines()[0]) if suffix == ".jsonl" else json.loads(path.read_text())[0]
    assert [t["from"] for t in record["conversations"][:4]] == ["human", "gpt", "human", "gpt"]
    assert record["conversations"][1]["value"] == "OK"


def _broken(tmp_path, mutate) -> str:
    records = json.loads(SAMPLE.read_text())
    mutate(records)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(records))
    return str(path)


@pytest.mark.parametrize("mutate, record, field", [
    (lambda r: r[1]["conversations"][5].update({"value": "I would take the book"}), "alfworld_demo_1",
     "conversations[5].value"),
    (lambda r: r[0]["conversations"][3].update({"from": "human"}), "alfworld_demo_0", "conversations[3].from"),
    (lambda r: r[1].pop("conversations"), "alfworld_demo_1", "(record)"),
    (lambda r: r[1].update({"reward": 3}), "alfworld_demo_1", "reward"),
    (lambda r: r[1].update({"id": "alfworld_demo_0"}), "alfworld_demo_0", "id"),
    (lambda r: r[0].update({"id": ""}), "#0", "id"),
])
def test_validation_names_record_and_field(tmp_path, mutate, record, field):
    path = _broken(tmp_path, mutate)
    with pytest.raises(ValidationError) as err:
        eto.load_eto(path, "alfworld")
    assert (err.value.source, str(err.value.record), err.value.field) == (path, record, field)


def test_import_compose_and_export(sand_home, tmp_path):
    store = Store()
    imported = datasets.import_eto(store, SAMPLE, "alfworld", Lineage(asset="test"))
    assert imported.ref.dataset == "import/eto_alfworld_sample" and imported.row_count == 2
    expert = datasets.compose_expert(store, Lineage(asset="test"))
    assert expert.row_count == 2
    path, n = datasets.export_eto(store, tmp_path / "x.jsonl")
    assert n == 2 and eto.load_eto(path, "alfworld") == eto.load_eto(SAMPLE, "alfworld")


def sand(*args, env):
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True, env=env)


def test_cli_import_sql_and_rejection(sand_home, tmp_path):
    import os

    env = {**os.environ}
    ok = sand("import", str(SAMPLE), "--env", "alfworld", "--direct", env=env)
    assert ok.returncode == 0, ok.stderr
    assert "imported 2 alfworld trajectories" in ok.stdout
    count = sand("sql", "select count(*) as n from trajectories where env = 'alfworld'", "--format", "csv", env=env)
    assert count.stdout.splitlines() == ["n", "2"]
    # A reader that stops early (`sand sql ... | head -1`) ends the command quietly, without a traceback.
    sql = subprocess.Popen([sys.executable, "-m", "jobs.cli", "sql", "select * from trajectories, range(2000)"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    sql.stdout.readline()
    sql.stdout.close()
    assert sql.wait(timeout=120) == 1 and b"Traceback" not in sql.stderr.read()

    bad = _broken(tmp_path, lambda r: r[1]["conversations"][5].update({"value": "no action here"}))
    before = sorted(p.name for p in sand_home.rglob("*.parquet"))
    rejected = sand("import", bad, "--env", "alfworld", "--direct", env=env)
    assert rejected.returncode != 0
    assert "alfworld_demo_1" in rejected.stderr and "conversations[5].value" in rejected.stderr
    assert "Traceback" not in rejected.stderr
    assert sorted(p.name for p in sand_home.rglob("*.parquet")) == before  # nothing stored

    out = tmp_path / "export.json"
    exported = sand("export", str(out), "--env", "alfworld", env=env)
    assert exported.returncode == 0 and "wrote 2 trajectories" in exported.stdout
    assert len(json.loads(out.read_text())) == 2


def test_installed_import_is_recorded_by_dagster(sand_home, tmp_path, capsys):
    """The installed `sand import` (jobs.cli) is an inbox import's Dagster runs: partition <env>/<file name> of
    imported_trajectories from the file where it is, then expert_trajectories; a rejected file changes nothing."""
    from dagster import AssetKey, DagsterInstance, DagsterRunStatus

    from jobs.cli import main

    main(["import", str(SAMPLE), "--env", "alfworld", "--no-resolve"])
    out = capsys.readouterr().out
    assert "imported 2 alfworld trajectories" in out and "'import/eto_alfworld_sample'" in out
    assert "expert set: 2 trajectories" in out and "runs: import_eto " in out
    store = Store()
    expert, version = store.read("trajectories", datasets.EXPERT), store.head("trajectories", datasets.EXPERT).version
    assert sorted(expert["id"]) == ["alfworld_demo_0", "alfworld_demo_1"]
    assert set(expert["resolution"]) == {"pending"}  # --no-resolve
    with DagsterInstance.get() as instance:
        [imported] = instance.fetch_materializations(AssetKey("imported_trajectories"), limit=10).records
        [composed] = instance.fetch_materializations(AssetKey("expert_trajectories"), limit=10).records
        assert imported.partition_key == "alfworld/eto_alfworld_sample.json"
        assert imported.storage_id < composed.storage_id
        assert composed.asset_materialization.tags["dagster/data_version"] == version

    bad = _broken(tmp_path, lambda r: r[1]["conversations"][5].update({"value": "no action here"}))
    with pytest.raises(SystemExit) as exit:
        main(["import", bad, "--env", "alfworld", "--no-resolve"])
    err = capsys.readouterr().err
    assert exit.value.code == 2
    assert bad in err and "alfworld_demo_1" in err and "conversations[5].value" in err
    assert store.head("trajectories", datasets.EXPERT).version == version
    assert [r.dataset for r in store.datasets("source_trajectories")] == ["import/eto_alfworld_sample"]
    with DagsterInstance.get() as instance:
        [failed] = [r for r in instance.get_runs() if r.status == DagsterRunStatus.FAILURE]
        assert (failed.job_name, failed.tags["dagster/partition"]) == ("import_eto", "alfworld/broken.json")
        assert len(instance.fetch_materializations(AssetKey("expert_trajectories"), limit=10).records) == 1
