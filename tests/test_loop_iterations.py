"""SAND beyond one iteration: the unrolled asset graph of `iterations: 3` (which edges join the iterations), and
two iterations run end to end with the tiny model, real ALFWorld games and a real Dagster instance."""
import pytest
from dagster import AssetCheckSeverity, PipesSubprocessClient, instance_for_test, materialize

from resources import AlfWorldResource, ComputeResource, SciWorldResource, StoreResource
from sand.experiment import EnvEval, EvalConfig, Experiment, SandConfig, TrainConfig
from sand.models.registry import tiny_model
from sand.store import Store
from sand_assets.expert_data import (
    alfworld_source_trajectories,
    alfworld_training_games,
    expert_trajectories,
    imported_trajectories,
    sciworld_source_trajectories,
)
from sand_assets.loop import build_loop_assets
from sand_assets.models import build_model_assets

STAGES = ("candidate_samples", "rollouts", "action_critiques", "deliberations", "deliberation_dataset",
          "finetuned_checkpoint", "evaluation")
CONTROL = ("control_checkpoint", "control_evaluation")


def dependencies(assets) -> dict[str, set[str]]:
    """Asset key -> the keys it depends on, from the assets' specs."""
    return {spec.key.to_user_string(): {dep.asset_key.to_user_string() for dep in spec.deps}
            for asset in assets for spec in asset.specs}


def test_three_iterations_chain_each_on_the_one_before():
    exp = Experiment(name="g", base_model="unused", sand=SandConfig(iterations=3),
                     evaluation=EvalConfig(envs={"alfworld": EnvEval(splits=["valid_seen"])}))
    deps = dependencies([*build_model_assets(exp), *build_loop_assets(exp)])
    loop_keys = {k for k in deps if k.startswith("g/iter_") and not k.startswith("g/iter_0/")}
    assert loop_keys == {f"g/iter_{k}/{stage}" for k in (1, 2, 3) for stage in (*STAGES, *CONTROL)}

    def data(k):  # D_k and pi_k as asset keys
        return "g/d0" if k == 0 else f"g/iter_{k}/deliberation_dataset"

    def policy(k):
        return "g/sft_checkpoint" if k == 0 else f"g/iter_{k}/finetuned_checkpoint"

    def iteration_of(key):
        return int(key.split("/")[1].removeprefix("iter_")) if key.startswith("g/iter_") else 0

    for k in (1, 2, 3):
        # Iteration k reads D_{k-1} and pi_{k-1}, and nothing older than iteration k-1 but the base model.
        assert {data(k - 1), policy(k - 1)} <= deps[f"g/iter_{k}/candidate_samples"]
        assert policy(k - 1) in deps[f"g/iter_{k}/rollouts"]
        assert deps[f"g/iter_{k}/finetuned_checkpoint"] >= {data(k), policy(k - 1)}
        assert deps[f"g/iter_{k}/evaluation"] == {policy(k)}
        # The control starts where pi_k starts, on the data before D_k, and learns pi_k's step count from it.
        assert deps[f"g/iter_{k}/control_checkpoint"] == {data(k - 1), policy(k - 1), policy(k)}
        assert deps[f"g/iter_{k}/control_evaluation"] == {f"g/iter_{k}/control_checkpoint"}
        earlier = {d for stage in STAGES for d in deps[f"g/iter_{k}/{stage}"]
                   if iteration_of(d) < k and d != "g/base_model"}
        assert earlier == {data(k - 1), policy(k - 1)}
        # Within an iteration the edges are the same for every k.
        within = {(stage, d.rpartition("/")[2]) for stage in STAGES for d in deps[f"g/iter_{k}/{stage}"]
                  if d.startswith(f"g/iter_{k}/")}
        assert within == {("rollouts", "candidate_samples"), ("action_critiques", "rollouts"),
                          ("deliberations", "candidate_samples"), ("deliberations", "rollouts"),
                          ("deliberations", "action_critiques"), ("deliberation_dataset", "deliberations"),
                          ("finetuned_checkpoint", "deliberation_dataset"), ("evaluation", "finetuned_checkpoint")}
    # No iteration reads a later one.
    assert all(iteration_of(d) <= iteration_of(key) for key, ds in deps.items() for d in ds)


@pytest.mark.slow
def test_two_iterations_end_to_end(sand_home):
    exp = Experiment(
        name="tiny", base_model=str(tiny_model()), train_data={"alfworld": None},
        # Full finetuning at a high rate; few steps, as three trainings run.
        train=TrainConfig(lora=False, learning_rate=3e-3, max_steps=8, per_device_batch_size=2,
                          gradient_accumulation_steps=1, max_length=1024, history_steps=4),
        evaluation=EvalConfig(pool_size=2, max_new_tokens=16, envs={
            "alfworld": EnvEval(splits=["valid_seen"], tasks_per_split=1, max_steps=3)}),
        sand=SandConfig(iterations=2, n_samples=2, rollout_max_steps=2, control=False))  # tests/test_control.py
    expert = [alfworld_training_games, alfworld_source_trajectories, sciworld_source_trajectories,
              imported_trajectories, expert_trajectories]
    model, loop = build_model_assets(exp), build_loop_assets(exp)
    base_model, d0, sft_checkpoint = model[:3]
    resources = {"store": StoreResource(home=str(sand_home)), "sciworld": SciWorldResource(),
                 "alfworld": AlfWorldResource(train_games=2), "compute": ComputeResource(torch_threads=1),
                 "pipes": PipesSubprocessClient()}
    with instance_for_test() as instance:
        result = materialize([*expert, *model, *loop], resources=resources, instance=instance, selection=[
            alfworld_training_games, alfworld_source_trajectories, expert_trajectories, base_model, d0,
            sft_checkpoint, *loop])
        assert result.success
        blocked = [(e.asset_key.to_user_string(), e.check_name) for e in result.get_asset_check_evaluations()
                   if not e.passed and e.severity == AssetCheckSeverity.ERROR]
        assert blocked == []

    store = Store(sand_home)
    d1 = store.read("trajectories", "tiny/iter_1")
    sampled = store.sql("select distinct trajectory_id from candidates where dataset = 'tiny/iter_2'")
    assert sorted(sampled["trajectory_id"].to_list()) == sorted(d1["id"].to_list())  # iteration 2 samples D_1
    # Each table of iteration 2 records reading D_1 and pi_1 (not D_0 or pi_0), and pi_2 was trained on D_2.
    reads = {}
    for table, inputs in store.sql("select \"table\", inputs from lineage where dataset = 'tiny/iter_2'").rows():
        reads.setdefault(table, set()).update((i["table"], i["dataset"]) for i in inputs)
    assert {("trajectories", "tiny/iter_1"), ("checkpoints", "tiny/iter_1")} <= reads["candidates"]
    assert ("checkpoints", "tiny/iter_1") in reads["rollouts"]
    assert ("trajectories", "tiny/iter_2") in reads["checkpoints"]
    assert not any(dataset in ("tiny/d0", "tiny/sft") for table in reads.values() for _, dataset in table)
    # pi_2 continues from pi_1, and both are evaluated.
    pi_1, pi_2 = (store.read("checkpoints", f"tiny/iter_{k}").row(0, named=True) for k in (1, 2))
    assert pi_2["init_checkpoint"] == pi_1["path"] != pi_2["path"]
    episodes = dict(store.sql("select agent, episodes from evaluation_summary").rows())
    assert episodes == {"iter_1": 1, "iter_2": 1}
