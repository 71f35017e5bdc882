"""The compute-matched control: pi_{k-1} trained on D_{k-1} for exactly as many optimizer steps as pi_k took on D_k
(real training of the tiny model), and the report putting iter_k vs control_k first."""
import polars as pl

from sand import stages
from sand.experiment import Experiment, TrainConfig
from sand.formats.eto import load_eto
from sand.models.registry import tiny_model
from sand.report import default_pairs
from sand.store import Lineage, Store
from sand.trajectory import to_frame
from tests.conftest import DATA


def test_the_control_trains_as_many_steps_as_pi_k_on_the_data_before_it(sand_home):
    store = Store(sand_home)
    trajectories = load_eto(DATA / "eto_alfworld_sample.json", "alfworld")
    # D_1 holds twice D_0's windows, so an epoch of D_1 is twice the steps of an epoch of D_0: matching the steps,
    # not the epochs, is what the control must do.
    exp = Experiment(name="c", base_model=str(tiny_model()), train=TrainConfig(
        epochs=1, iteration_epochs=[1], per_device_batch_size=1, gradient_accumulation_steps=1, history_steps=2,
        max_length=1024))
    d0 = to_frame(trajectories)
    d1 = pl.concat([d0, d0.with_columns(pl.col("id") + "-again")])
    for name, frame in (("c/d0", d0), ("c/iter_1", d1)):
        store.write("trajectories", name, frame, Lineage(asset="test"))
    log = []
    for k, control in ((0, False), (1, False), (1, True)):
        stages.finetune(exp, store, k, lambda table: Lineage(asset="test"), log=log.append, control=control)
    rows = {r["dataset"]: r for r in store.sql("select * from checkpoints").iter_rows(named=True)}
    sft, pi_1, control = rows["c/sft"], rows["c/iter_1"], rows["c/control_1"]
    assert pi_1["train_steps"] == 2 * sft["train_steps"] > 0  # one epoch of D_1
    assert control["train_steps"] == pi_1["train_steps"]
    assert control["init_checkpoint"] == pi_1["init_checkpoint"] == sft["path"]
    assert [d["dataset"] for d in control["train_data"]] == ["c/d0"]
    assert control["path"] not in (pi_1["path"], sft["path"])
    assert any(f"for {pi_1['train_steps']} steps, as many as pi_1" in line for line in log)


def test_reports_compare_each_sand_agent_with_its_control_first():
    agents = ["base", "sft", "control_1", "iter_1", "control_2", "iter_2"]
    pairs = default_pairs(agents)
    assert pairs[:2] == [("iter_1", "control_1"), ("iter_2", "control_2")]
    assert ("control_1", "iter_1") not in pairs and ("iter_1", "sft") in pairs and ("control_1", "sft") in pairs
    assert len(pairs) == len(set(pairs)) == 15  # every pair of the six agents once
    assert default_pairs(["base", "sft", "iter_1"]) == [("sft", "base"), ("iter_1", "base"), ("iter_1", "sft")]
