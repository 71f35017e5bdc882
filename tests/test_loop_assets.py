"""The whole SAND loop as Dagster assets: tiny model, real ALFWorld games, a real Dagster instance and
DuckDB catalog. Checks each stage's table, the lineage question, and that a rerun is a no-op."""
import polars as pl
import pytest
from dagster import AssetCheckSeverity, PipesSubprocessClient, instance_for_test, materialize

from resources import AlfWorldResource, ComputeResource, SciWorldResource, StoreResource
from sand.experiment import EnvEval, EvalConfig, Experiment, SandConfig, TrainConfig
from sand.models.registry import tiny_model
from sand.sand_loop.synthesis import dataset_id
from sand.selection import training_subset
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

LINEAGE_QUESTION = """
-- Which critiques, made by which model, produced the thoughts the checkpoint of iteration K was trained on?
select c.asset as checkpoint_asset, d.dataset as trained_on, cr.dataset as critiques, cr.data_version,
       json_extract_string(cr.metadata, '$.critic') as critic, count(*) as critique_rows
from lineage c
join lineage d on d."table" = 'trajectories' and d.data_version = list_extract(c.inputs, 1).version
join lineage cr on cr."table" = 'critiques'
     and list_contains(list_transform(d.inputs, lambda x: x.version), cr.data_version)
join critiques_all r on r.version = cr.data_version
where c."table" = 'checkpoints' and c.iteration = {k}
group by all
"""


@pytest.mark.slow
def test_one_sand_iteration_end_to_end(sand_home):
    exp = Experiment(
        name="tiny", base_model=str(tiny_model()), train_data={"alfworld": None},
        # Full finetuning at a high rate: enough for the random tiny model to emit actions, so that its
        # samples disagree with the expert at some steps.
        train=TrainConfig(lora=False, learning_rate=3e-3, max_steps=40, per_device_batch_size=2,
                          gradient_accumulation_steps=1, max_length=1024, history_steps=4),
        # 256: a reply budget that holds a deliberation naming two of the tiny agent's candidates (sampled with
        # up to 96 tokens each); every thought must fit in it.
        evaluation=EvalConfig(pool_size=2, max_new_tokens=256, envs={
            "alfworld": EnvEval(splits=["valid_seen"], tasks_per_split=1, max_steps=3)}),
        sand=SandConfig(iterations=1, n_samples=2, rollout_max_steps=2))
    expert = [alfworld_training_games, alfworld_source_trajectories, sciworld_source_trajectories,
              imported_trajectories, expert_trajectories]
    loop = build_loop_assets(exp)
    model = build_model_assets(exp)
    resources = {"store": StoreResource(home=str(sand_home)), "sciworld": SciWorldResource(),
                 "alfworld": AlfWorldResource(train_games=2), "compute": ComputeResource(torch_threads=1),
                 "pipes": PipesSubprocessClient()}
    base_model, d0, sft_checkpoint = model[:3]
    selection = [alfworld_training_games, alfworld_source_trajectories, expert_trajectories, base_model, d0,
                 sft_checkpoint, *loop]
    with instance_for_test() as instance:
        result = materialize([*expert, *model, *loop], selection=selection, resources=resources,
                             instance=instance)
        assert result.success
        checks = {(e.asset_key.to_user_string(), e.check_name): e for e in result.get_asset_check_evaluations()}
        blocking = [("tiny/d0", "trajectories_valid"), ("tiny/sft_checkpoint", "checkpoint_usable"),
                    ("tiny/iter_1/deliberation_dataset", "trajectories_valid"),
                    ("tiny/iter_1/finetuned_checkpoint", "checkpoint_usable"),
                    ("tiny/iter_1/evaluation", "episodes_complete")]
        assert [check for check in blocking if not checks[check].passed] == []
        # The untrained tiny writer fails validation everywhere: the fallback check warns, it does not block.
        fallback = checks["tiny/iter_1/deliberations", "fallback_rate"]
        assert not fallback.passed and fallback.severity == AssetCheckSeverity.WARN
        store = Store(sand_home)
        # One asset per table: each loop dataset's lineage names the asset that wrote it.
        writers = store.sql("select \"table\", asset from lineage where dataset in ('tiny/d0', 'tiny/iter_1') "
                            "and \"table\" in ('candidates', 'rollouts', 'critiques', 'deliberations', "
                            "'trajectories') group by all order by all").rows()
        assert writers == [("candidates", "tiny/iter_1/candidate_samples"),
                           ("critiques", "tiny/iter_1/action_critiques"),
                           ("deliberations", "tiny/iter_1/deliberations"), ("rollouts", "tiny/iter_1/rollouts"),
                           ("trajectories", "tiny/d0"), ("trajectories", "tiny/iter_1/deliberation_dataset")]
        steps = store.sql("select count(*) as n, sum(uncertain::int) as u from candidates "
                          "where dataset = 'tiny/iter_1'").row(0, named=True)
        total_steps = store.sql("select sum(n_steps) from trajectories where dataset = 'tiny/d0'").item()
        assert steps["n"] == total_steps and steps["u"] > 0
        rollouts = store.sql("select count(*) from rollouts where dataset = 'tiny/iter_1'").item()
        critiques = store.sql("select count(*) from critiques where dataset = 'tiny/iter_1'").item()
        assert rollouts == critiques > 0
        deliberations = store.sql("select count(*) from deliberations where dataset = 'tiny/iter_1'").item()
        # Steps whose candidates are too long for any deliberation within the budget keep their thought.
        [synthesis] = [m.materialization for m in result.get_asset_materialization_events()
                       if m.asset_key.to_user_string() == "tiny/iter_1/deliberations"]
        assert 0 < deliberations == steps["u"] - synthesis.metadata["unfit"].value
        d1 = store.sql("select count(*) from steps where dataset = 'tiny/iter_1' "
                       "and thought like 'Let me weigh my options:%'").item()
        assert d1 == deliberations
        # pi_1 and its compute-matched control: pi_0 trained on D_0 (not D_1) for as many optimizer steps.
        pi_1, control = (store.read("checkpoints", f"tiny/{name}").row(0, named=True)
                         for name in ("iter_1", "control_1"))
        assert control["train_steps"] == pi_1["train_steps"] and control["init_checkpoint"] == pi_1["init_checkpoint"]
        assert [d["dataset"] for d in control["train_data"]] == ["tiny/d0"] and control["path"] != pi_1["path"]
        episodes = dict(store.sql("select agent, episodes from evaluation_summary").rows())
        assert episodes == {"iter_1": 1, "control_1": 1}

        answer = store.sql(LINEAGE_QUESTION.format(k=1))
        assert answer.height == 1
        row = answer.row(0, named=True)
        assert row["trained_on"] == "tiny/iter_1" and row["critiques"] == "tiny/iter_1"
        assert row["critic"] == exp.base_model and row["critique_rows"] == critiques

        # Unchanged inputs and code: rematerializing the loop writes no new dataset version (but the comparisons
        # of iter_1, evaluated before control_1 existed, now with control_1).
        def stored():
            return sorted(p.relative_to(sand_home) for p in (sand_home / "datasets").rglob("*.parquet")
                          if p.parent.parent.name != "agent_comparisons")

        before = stored()
        again = materialize([*expert, *model, *loop], selection=loop, resources=resources, instance=instance)
        assert again.success
        assert stored() == before
        compared = store.sql("select agent, baseline from agent_comparison where experiment = 'tiny'").rows()
        assert sorted(set(compared)) == [("control_1", "iter_1"), ("iter_1", "control_1")]

        # An ablation branching off the same SFT: its checkpoint and samples are found, not recomputed.
        ablation = exp.model_copy(update={"name": "tiny_no_critique",
                                          "sand": exp.sand.model_copy(update={"critique": False})})
        trained = sorted((sand_home / "checkpoints").iterdir())
        model_b, loop_b = build_model_assets(ablation), build_loop_assets(ablation)
        branch = materialize([*expert, *model_b, *loop_b], selection=[*model_b[:3], loop_b[0]],
                             resources=resources, instance=instance)
        assert branch.success
        assert sorted((sand_home / "checkpoints").iterdir()) == trained  # no second SFT run
        assert len(list((sand_home / "work" / "candidates").iterdir())) == 1
        versions = store.sql("select distinct version from candidates where dataset like 'tiny%/iter_1'")
        assert versions.height == 1
        paths = store.sql("select distinct path from checkpoints where iteration = 0")
        assert paths.height == 1

        # A share of D_0 (`sand.trajectories`): the iteration samples the steps of that share only, and D_1
        # carries the other trajectories unchanged.
        share = exp.model_copy(update={"name": "tiny_share",
                                       "sand": exp.sand.model_copy(update={"trajectories": {"alfworld": 1}})})
        model_s, loop_s = build_model_assets(share), build_loop_assets(share)
        assert materialize([*expert, *model_s, *loop_s], selection=[*model_s[:3], *loop_s[:3]],
                           resources=resources, instance=instance).success
        sampled = store.sql("select list(distinct trajectory_id) as ids, count(*) as n from candidates "
                            "where dataset = 'tiny_share/iter_1'").row(0, named=True)
        d0 = store.read("trajectories", "tiny_share/d0")
        [first] = training_subset(d0, {"alfworld": 1}).iter_rows(named=True)
        assert sampled == {"ids": [first["id"]], "n": first["n_steps"]}
        d1 = store.read("trajectories", "tiny_share/iter_1")
        assert d1["id"].to_list() == [dataset_id(i) if i == first["id"] else i for i in d0["id"].to_list()]
        carried = d0.filter(pl.col("id") != first["id"])
        assert carried.height > 0 and d1.filter(pl.col("id").is_in(carried["id"].to_list())).equals(carried)
