"""Experiment model assets on a real Dagster instance: SFT through Pipes in a child process, evaluations
in real environments, rows in the catalog's checkpoints / evaluations / lineage views."""
import json

import pytest
from dagster import Definitions, PipesSubprocessClient, instance_for_test, load_assets_from_modules, materialize

from jobs.experiments import experiment_job
from resources import AlfWorldResource, ComputeResource, SciWorldResource, StoreResource
from sand import datasets
from sand.errors import SandError
from sand.experiment import EnvEval, EvalConfig, Experiment, TrainConfig, load_experiment, load_experiments
from sand.models.checkpoints import checkpoint_problems
from sand.models.registry import tiny_model
from sand.store import Lineage, Store
from sand_assets import expert_data
from sand_assets.expert_data import expert_trajectories
from sand_assets.models import build_model_assets
from tests.conftest import DATA


def tiny_experiment() -> Experiment:
    return Experiment(
        name="tiny", base_model=str(tiny_model()), train_data={"alfworld": None},
        train=TrainConfig(max_steps=3, per_device_batch_size=1, gradient_accumulation_steps=1, max_length=512),
        evaluation=EvalConfig(pool_size=2, max_new_tokens=16, envs={
            "alfworld": EnvEval(splits=["valid_seen"], tasks_per_split=2, max_steps=3),
            "sciworld": EnvEval(splits=["dev"], task_names=["find-plant"], variations_per_task=1, max_steps=3),
        }))


def test_sft_and_evaluations_land_in_the_catalog(sand_home):
    store = Store(sand_home)
    datasets.import_eto(store, DATA / "eto_alfworld_sample.json", "alfworld", Lineage(asset="test"))
    datasets.compose_expert(store, Lineage(asset="test"))
    exp = tiny_experiment()
    assets = build_model_assets(exp)
    resources = {"store": StoreResource(home=str(sand_home)), "sciworld": SciWorldResource(),
                 "alfworld": AlfWorldResource(), "compute": ComputeResource(torch_threads=1),
                 "pipes": PipesSubprocessClient()}
    with instance_for_test() as instance:
        result = materialize([expert_trajectories, *assets], selection=assets, resources=resources, instance=instance)
        assert result.success
        checkpoint = store.sql("select path, lora, train_steps, final_loss, examples from checkpoints "
                               "where experiment = 'tiny'").row(0, named=True)
        # Two trajectories, each longer than max_length (512) in the tiny model's tokens: 5 windows that fit.
        assert checkpoint["lora"] and checkpoint["train_steps"] == 3 and checkpoint["examples"] == 5
        assert (store.resolve(checkpoint["path"]) / "adapter_config.json").exists()
        summary = store.sql("select agent, env, split, episodes, avg_reward, format_error_rate "
                            "from evaluation_summary where experiment = 'tiny' order by agent, env")
        assert summary.select("agent", "env", "split", "episodes").rows() == [
            ("base", "alfworld", "valid_seen", 2), ("base", "sciworld", "dev", 1),
            ("sft", "alfworld", "valid_seen", 2), ("sft", "sciworld", "dev", 1)]
        assert summary["avg_reward"].is_between(0, 100).all()
        # Every episode can be read step by step: the agent's reply and the environment's answer.
        per_episode = store.sql("select agent, task_id, steps from evaluations where experiment = 'tiny'")
        per_step = store.sql("select agent, task_id, count(*) as steps, count(reply) as replies, "
                             "count(observation) as observations from evaluation_steps where experiment = 'tiny' "
                             "group by all")
        assert sorted(per_step.select("agent", "task_id", "steps").rows()) == sorted(per_episode.rows())
        assert per_step["replies"].to_list() == per_step["observations"].to_list() == per_step["steps"].to_list()
        # Each evaluation recorded its intervals and its comparisons with the agent evaluated before it.
        assert store.sql("select count(*) from evaluation_summary where experiment = 'tiny' and ci_lo <= avg_reward "
                         "and avg_reward <= ci_hi").item() == 4
        assert sorted(store.sql("select agent, baseline from agent_comparison where experiment = 'tiny'").rows()) == \
            [("base", "sft")] * 2 + [("sft", "base")] * 2
        metadata = result.asset_materializations_for_node("tiny__iter_0__evaluation")[0].metadata
        assert {"alfworld/valid_seen/ci_lo", "sciworld/dev/ci_hi", "sciworld/dev/episodes"} <= set(metadata)
        # Lineage answers which data trained the evaluated checkpoint.
        trained_on = store.sql("""
            select d.dataset from lineage e, unnest(e.inputs) as i(ref), lineage c, unnest(c.inputs) as j(d)
            where e.asset = 'tiny/iter_0/evaluation' and c.asset = 'tiny/sft_checkpoint'
              and c."table" = 'checkpoints' and ref.version = c.data_version""")
        assert trained_on["dataset"].to_list() == ["tiny/d0"]

        # Unchanged inputs: rematerializing trains nothing new.
        before = store.sql("select count(*) from checkpoints_all").item()
        again = materialize([expert_trajectories, *assets], selection=[assets[2]], resources=resources,
                            instance=instance)
        assert again.success and store.sql("select count(*) from checkpoints_all").item() == before


def test_checkpoint_check_names_what_is_wrong(sand_home):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    store = Store(sand_home)
    folder = sand_home / "checkpoints" / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model()),
                   LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(folder)
    row = {"path": "checkpoints/adapter", "lora": True, "final_loss": 1.5, "base_model": str(tiny_model())}
    assert checkpoint_problems(store, row) == []
    assert checkpoint_problems(store, {**row, "final_loss": float("nan")}) == ["final loss is nan"]
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))  # not the shape of its weights
    [problem] = checkpoint_problems(store, row)
    assert "peft cannot load the adapter" in problem and "size mismatch" in problem
    (folder / "adapter_model.safetensors").unlink()
    assert checkpoint_problems(store, row) == [f"{folder}: no adapter_model.safetensors"]


def test_shipped_experiments_load():
    names = [e.name for e in load_experiments()]
    assert "quickstart" in names and "paper" in names


def test_epochs_per_iteration(tmp_path):
    paper = next(e for e in load_experiments() if e.name == "paper")
    assert [paper.train.epochs_of(k) for k in range(4)] == [3, 3, 1, 1]  # SFT, then SAND: 3 in round 1, 1 after
    path = tmp_path / "x.yaml"
    path.write_text(json.dumps({"train": {"iteration_epochs": []}}))
    with pytest.raises(SandError, match=r"x.yaml: invalid experiment: train.iteration_epochs"):
        load_experiment(path)


def test_bad_experiment_names_the_field(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(json.dumps({"train": {"learnin_rate": 1}}))
    with pytest.raises(SandError, match=r"x.yaml: invalid experiment: train.learnin_rate"):
        load_experiment(path)


def test_experiment_resource_settings_and_trained_task_types_become_its_job_config():
    exp = Experiment(name="more_games", resources={"alfworld": {"train_games": 160}})
    assert experiment_job(exp).config == {"resources": {"alfworld": {"config": {"train_games": 160}}}}
    # Gold paths are recorded for the ScienceWorld task types the experiment trains on, and only those.
    exp = Experiment(name="few_tasks", train_tasks={"sciworld": ["find-plant", "find-animal"]})
    assert experiment_job(exp).config == {
        "ops": {"sciworld_source_trajectories": {"config": {"tasks": ["find-plant", "find-animal"]}}}}
    assert experiment_job(Experiment(name="all_tasks", train_tasks={"alfworld": ["pick_and_place"]})).config is None


def test_an_experiment_job_records_the_expert_data_of_the_environments_it_trains_on(sand_home):
    def expert_assets(exp):
        defs = Definitions(assets=load_assets_from_modules([expert_data]), jobs=[experiment_job(exp)], resources={
                               "store": StoreResource(home=str(sand_home)), "sciworld": SciWorldResource(),
                               "alfworld": AlfWorldResource()})
        keys = defs.resolve_job_def(exp.name).asset_layer.executable_asset_keys
        return sorted(k.to_user_string() for k in keys)

    assert expert_assets(Experiment(name="sci", train_data={"sciworld": None})) == [
        "expert_trajectories", "sciworld_source_trajectories"]
    assert expert_assets(Experiment(name="both")) == [
        "alfworld_source_trajectories", "alfworld_training_games", "expert_trajectories",
        "sciworld_source_trajectories"]
    for resources, problem in [
            ({"alfworld": {"train_gamez": 1}}, r"resources.alfworld: unknown settings \['train_gamez'\]"),
            ({"alfworld": {"train_games": "many"}}, "resources.alfworld: train_games: Input should be"),
            ({"gpu": {}}, "resources.gpu: no such resource")]:
        with pytest.raises(SandError, match=f"experiment more_games: {problem}"):
            experiment_job(Experiment(name="more_games", resources=resources))
