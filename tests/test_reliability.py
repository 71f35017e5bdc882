"""Reliability of the store: imports are all-or-nothing, concurrent writers lose nothing, the catalog is
read-only to queries and survives damage, work-log parts are committed whole. Real processes, real DuckDB."""
import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import duckdb
import polars as pl
import pytest

from jobs.cli import main
from sand import datasets
from sand.errors import SandError
from sand.store import Lineage, Store
from sand.worklog import WorkLog
from tests.conftest import DATA, REPO

SAMPLE = json.loads((DATA / "eto_alfworld_sample.json").read_text())


def eto_file(path, ids, value_size=0):
    """An ETO file of the sample's first record under each id."""
    records = []
    for tid in ids:
        record = json.loads(json.dumps(SAMPLE[0]))
        record["id"] = tid
        if value_size:
            record["conversations"][4]["value"] = "Observation: " + "x" * value_size
        records.append(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path


DIRECT = ("--env", "alfworld", "--direct")  # the engine's import: what these tests are about


@pytest.fixture
def run_sand(capsys, monkeypatch):
    """`sand ...` in this process: (exit code, stdout, stderr)."""
    def run(*args, env=None):
        with monkeypatch.context() as patch:
            for name, value in (env or {}).items():
                patch.setenv(name, value)
            capsys.readouterr()
            try:
                main(list(args))
                code = 0
            except SystemExit as exc:
                code = exc.code
        out, err = capsys.readouterr()
        return code, out, err
    return run


def expert_ids(home):
    return sorted(Store(home).read("trajectories", datasets.EXPERT)["id"])


# --- imports: all or nothing ------------------------------------------------------------------------

def test_rejected_import_stores_nothing_and_later_imports_work(sand_home, tmp_path, run_sand):
    assert run_sand("import", str(eto_file(tmp_path / "a.json", ["x", "y"])), *DIRECT)[0] == 0
    code, _, err = run_sand("import", str(eto_file(tmp_path / "b.json", ["z", "x"])), *DIRECT)
    assert code == 2 and "'x'" in err and "import/a" in err and "Traceback" not in err
    store = Store(sand_home)
    assert store.head("source_trajectories", "import/b") is None  # nothing of the rejected file was stored
    code, _, err = run_sand("import", str(eto_file(tmp_path / "c.json", ["w"])), *DIRECT)
    assert code == 0, err
    assert expert_ids(sand_home) == ["w", "x", "y"]


def test_same_file_name_from_another_folder_is_refused(sand_home, tmp_path, run_sand):
    first = eto_file(tmp_path / "one" / "demo.json", ["a"])
    assert run_sand("import", str(first), *DIRECT)[0] == 0
    code, _, err = run_sand("import", str(eto_file(tmp_path / "two" / "demo.json", ["b"])), *DIRECT)
    assert code == 2 and str(first) in err and "rename" in err
    assert expert_ids(sand_home) == ["a"]
    eto_file(first, ["a", "c"])  # the same file again, changed: a new version replaces the old
    assert run_sand("import", str(first), *DIRECT)[0] == 0
    assert expert_ids(sand_home) == ["a", "c"]


def test_import_size_limits(sand_home, tmp_path, run_sand):
    big = eto_file(tmp_path / "big.json", ["a"], value_size=3000)
    code, _, err = run_sand("import", str(big), *DIRECT, env={"SAND_IMPORT_MAX_MB": "0.002"})
    assert code == 2 and "SAND_IMPORT_MAX_MB" in err
    code, _, err = run_sand("import", str(big), *DIRECT, env={"SAND_IMPORT_MAX_FIELD_CHARS": "1000"})
    assert code == 2 and "conversations[4].value" in err and "SAND_IMPORT_MAX_FIELD_CHARS" in err
    assert Store(sand_home).datasets("source_trajectories") == []
    assert run_sand("import", str(big), *DIRECT)[0] == 0  # within the defaults


def test_a_source_that_clashes_is_not_stored(sand_home):
    store = Store(sand_home)
    traj = datasets.eto.load_eto(DATA / "eto_alfworld_sample.json", "alfworld")
    datasets.write_source(store, "one", traj[:1], Lineage(asset="t"))
    with pytest.raises(SandError, match="both source datasets"):
        datasets.write_source(store, "two", traj, Lineage(asset="t"))
    assert [r.dataset for r in store.datasets("source_trajectories")] == ["one"]
    assert datasets.compose_expert(store, Lineage(asset="t")).row_count == 1


# --- one writer at a time --------------------------------------------------------------------------

IMPORTER = textwrap.dedent("""
    import sys, time
    from jobs.cli import main
    start = float(sys.argv[1])
    time.sleep(max(0.0, start - time.time()))  # all processes begin together
    for path in sys.argv[2:]:
        main(["import", path, "--env", "alfworld", "--direct"])
""")


def start_together(script, *args_per_process, delay=6.0):
    start = str(time.time() + delay)  # after every interpreter has started
    return [subprocess.Popen([sys.executable, "-c", script, start, *args], cwd=REPO, stderr=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, text=True) for args in args_per_process]


def test_concurrent_imports_keep_every_row(sand_home, tmp_path):
    files = [[str(eto_file(tmp_path / f"f{i}_{k}.json", [f"t{i}_{k}"])) for k in range(3)] for i in range(3)]
    for proc in start_together(IMPORTER, *files):
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
    assert expert_ids(sand_home) == sorted(f"t{i}_{k}" for i in range(3) for k in range(3))
    # No version of D_0 ever dropped rows an earlier one had: each recomposition saw every source before it.
    sizes = Store(sand_home).sql("select row_count from lineage where dataset = 'expert' order by created_at")
    assert sizes["row_count"].to_list() == sorted(sizes["row_count"])


APPENDER = textwrap.dedent("""
    import sys, polars as pl
    from sand.worklog import WorkLog
    import time
    time.sleep(max(0.0, float(sys.argv[1]) - time.time()))  # all processes begin together
    log, who, n = WorkLog(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    print("ready", flush=True)
    for i in range(n):
        key = f"{who}-{i}"
        if sys.argv[5] == "one":
            log.append(pl.DataFrame({"key": [key]}))
        else:
            log.append_together(rollouts=pl.DataFrame({"key": [key] * 3}), critiques=pl.DataFrame({"key": [key]}))
""")


def test_worklog_parts_from_two_processes_are_all_kept(tmp_path):
    procs = start_together(APPENDER, *[(str(tmp_path / "log"), who, "100", "one") for who in "ab"])
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    keys = WorkLog(tmp_path / "log").frame()["key"]
    assert keys.len() == 200 and keys.n_unique() == 200


def test_tables_committed_together_survive_a_kill(tmp_path):
    """A stage killed while writing leaves each unit's rollouts and critique both, or neither."""
    proc = subprocess.Popen([sys.executable, "-c", APPENDER, "0", str(tmp_path / "log"), "a", "100000", "together"],
                            cwd=REPO, stdout=subprocess.PIPE)
    proc.stdout.readline()
    log = WorkLog(tmp_path / "log")
    while not log.exists("critiques") or log.frame("critiques").height < 20:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rollouts, critiques = log.frame("rollouts"), log.frame("critiques")
    assert rollouts.height == 3 * critiques.height
    assert sorted(rollouts["key"].unique()) == sorted(critiques["key"])
    assert not log.exists()  # the single-table view holds none of these parts


# --- the catalog -----------------------------------------------------------------------------------

@pytest.fixture
def imported(sand_home, tmp_path, run_sand):
    assert run_sand("import", str(eto_file(tmp_path / "a.json", ["x", "y"])), *DIRECT)[0] == 0
    return sand_home


@pytest.mark.parametrize("query", [
    "create table t as select 1",
    "drop view trajectories",
    "copy (select 1) to '{out}'",
    "copy (select 1) to '{home}/datasets/trajectories/expert/evil.parquet'",
    "attach '{out}.db'",
    "select * from read_text('/etc/passwd')",
    "select 1; set enable_external_access = true",
])
def test_sql_is_read_only(imported, tmp_path, run_sand, query):
    before = sorted(p.relative_to(imported) for p in imported.rglob("*") if "catalog" not in p.name)
    code, _, err = run_sand("sql", query.format(out=tmp_path / "out.csv", home=imported))
    assert code == 2 and "Traceback" not in err and err.startswith("error:")
    assert not list(tmp_path.glob("out.csv*"))
    assert sorted(p.relative_to(imported) for p in imported.rglob("*") if "catalog" not in p.name) == before
    code, out, _ = run_sand("sql", "select count(*) as n from trajectories", "--format", "csv")
    assert code == 0 and out.split() == ["n", "2"]


def test_damaged_catalog_is_rebuilt_and_never_blocks_readers(imported, tmp_path, run_sand):
    with duckdb.connect(str(imported / "catalog.duckdb")) as con:
        con.execute("drop view evaluations; create table evaluations as select 1 as x; drop view trajectories")
    assert run_sand("sql", "select count(*) from trajectories")[0] == 0  # readers never use the file
    assert run_sand("report", "nothing")[0] == 0  # the evaluation views are intact for readers
    # A process holding the catalog file open (read-write) blocks neither queries nor writes.
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys; c = duckdb.connect(sys.argv[1]); "
                               "print('open', flush=True); sys.stdin.read()", str(imported / "catalog.duckdb")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()
        start = time.monotonic()
        code, out, err = run_sand("sql", "select count(*) as n from trajectories", "--format", "csv")
        assert code == 0 and out.split() == ["n", "2"], err
        assert time.monotonic() - start < 20
        assert run_sand("import", str(eto_file(tmp_path / "b.json", ["z"])), *DIRECT)[0] == 0
    finally:
        holder.communicate("")
    # The next write rebuilds the catalog's views from the Parquet files.
    assert run_sand("import", str(eto_file(tmp_path / "c.json", ["w"])), *DIRECT)[0] == 0
    with duckdb.connect(str(imported / "catalog.duckdb"), read_only=True) as con:
        kinds = dict(con.execute("select table_name, table_type from information_schema.tables").fetchall())
        assert kinds["evaluations"] == "VIEW" and kinds["trajectories"] == "VIEW"
        assert con.execute("select count(*) from trajectories").fetchone() == (4,)


def test_catalog_that_is_not_a_database_is_rebuilt(imported, tmp_path, run_sand):
    (imported / "catalog.duckdb").write_bytes(b"garbage" * 100)
    assert run_sand("import", str(eto_file(tmp_path / "b.json", ["z"])), *DIRECT)[0] == 0
    with duckdb.connect(str(imported / "catalog.duckdb"), read_only=True) as con:
        assert con.execute("select count(*) from trajectories").fetchone() == (3,)


# --- what a rerun and a moved home see --------------------------------------------------------------

def test_noop_rerun_adds_no_lineage(sand_home, tmp_path, run_sand):
    path = eto_file(tmp_path / "a.json", ["x"])
    for _ in range(2):
        assert run_sand("import", str(path), *DIRECT)[0] == 0
    assert Store(sand_home).sql("select count(*) from lineage").item() == 2  # the source and D_0, once each


def test_home_can_be_moved(sand_home, tmp_path):
    store = Store(sand_home)
    checkpoint = sand_home / "checkpoints" / "exp" / "sft" / "v1"
    row = {"path": str(checkpoint), "lora": True, "base_model": "m", "base_model_hash": "h"}
    from sand.schemas import TABLES
    df = pl.DataFrame([{c: row.get(c) for c in TABLES["checkpoints"]}], schema=TABLES["checkpoints"])
    written = store.write("checkpoints", "exp/sft", df, Lineage(asset="t"))
    assert store.sql("select path from checkpoints").item() == "checkpoints/exp/sft/v1"
    assert store.sql("select path from lineage").item().startswith("datasets/checkpoints/")
    moved = tmp_path / "moved"
    shutil.copytree(sand_home, moved)
    again = Store(moved)
    assert again.read("checkpoints", "exp/sft")["path"][0] == str(moved / "checkpoints/exp/sft/v1")
    rewritten = again.write("checkpoints", "exp/sft",
                            df.with_columns(path=pl.lit(str(moved / "checkpoints/exp/sft/v1"))), Lineage(asset="t"))
    assert rewritten.ref == written.ref and not rewritten.created  # same content, same version: nothing to redo


def test_a_moved_home_finds_its_later_iterations_trained(tmp_path):
    """pi_k (k >= 1) starts from pi_{k-1}'s folder: its plan and row name that folder relative to SAND_HOME, so a
    copied home plans the same output folder (no retraining) and reads every path inside itself."""
    from sand.experiment import Experiment
    from sand.models.checkpoints import checkpoint_row, plan_training
    from sand.models.registry import tiny_model
    from sand.schemas import TABLES
    from sand.store import DatasetRef

    exp = Experiment(name="exp", base_model=str(tiny_model()))
    data = DatasetRef("trajectories", "exp/iter_1", "v1")
    homes = [tmp_path / "home", tmp_path / "copy"]
    plans = [plan_training(exp, Store(h), 1, data, init=str(h / "checkpoints" / "pi0")) for h in homes]
    assert plans[0].output.relative_to(homes[0]) == plans[1].output.relative_to(homes[1])
    metrics = {"examples": 1, "steps": 1, "final_loss": 1.0, "seconds": 1.0, "tokens_per_second": 1.0,
               "loss_curve": []}
    row = checkpoint_row(exp, plans[0], "exp/iter_1/finetuned_checkpoint", 1, metrics)
    Store(homes[0]).write("checkpoints", "exp/iter_1", pl.DataFrame([row], schema=TABLES["checkpoints"]),
                          Lineage(asset="t"))
    assert Store(homes[0]).sql("select init_checkpoint from checkpoints").item() == "checkpoints/pi0"
    shutil.rmtree(homes[1])
    shutil.copytree(homes[0], homes[1])
    copied = Store(homes[1]).read("checkpoints", "exp/iter_1").row(0, named=True)
    assert copied["init_checkpoint"] == str(homes[1] / "checkpoints" / "pi0")
    assert copied["path"] == str(plans[1].output)
