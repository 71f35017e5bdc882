"""Per-experiment model assets: the base model, D_0, behaviour initialisation (SFT) and evaluations, and the
factories of the checkpoint and evaluation assets the SAND iterations reuse.

Built by a factory from each experiments/*.yaml, under the experiment's key prefix:
  <exp>/base_model ─► <exp>/base_evaluation
  expert_trajectories ─► <exp>/d0 ─► <exp>/sft_checkpoint (pi_0) ─► <exp>/iter_0/evaluation
Training runs in a child process through Dagster Pipes (`python -m sand.training.pipes_main`, or the
experiment's launcher such as `accelerate launch`); checkpoints are folders the trainer writes,
never pickled values. Checks: D_0's content, each checkpoint's folder, each evaluation's episodes (blocking).
"""
import os

from dagster import (
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    DataVersion,
    Failure,
    MaterializeResult,
    MetadataValue,
    PipesSubprocessClient,
    asset,
)

from resources import AlfWorldResource, ComputeResource, SciWorldResource, StoreResource
from sand import stages
from sand.experiment import Experiment
from sand.models.checkpoints import TrainPlan, checkpoint_problems, training_command
from sand.validation import trajectory_problems
from sand.versioning import code_version
from sand_assets.common import backends, check_result, dataset_result, environments, lineage_of
from sand_assets.expert_data import alfworld_heldout_games, expert_trajectories

D_K_CHECK = "trajectories_valid"  # D_k's content check (sand.validation), D_0 included


def base_model_key(exp: Experiment) -> AssetKey:
    return AssetKey([exp.name, "base_model"])


def evaluation_data(exp: Experiment) -> list:
    """Game assets the experiment's evaluation splits read besides the released ones."""
    alfworld = exp.evaluation.envs.get("alfworld")
    return [alfworld_heldout_games] if alfworld and "heldout" in alfworld.splits else []


def finetune_asset(exp: Experiment, k: int, key: AssetKey, deps: list, description: str,
                   control: bool = False) -> AssetsDefinition:
    """pi_k's asset (or with `control`, its compute-matched control's): the engine plans the training, Dagster
    Pipes runs it in a child process."""

    @asset(key=key, group_name=exp.name, deps=deps, pool="gpu", kinds={"pytorch"},
           code_version=stages.stage_code("finetune"), description=description,
           check_specs=[AssetCheckSpec("checkpoint_usable", asset=key, blocking=True,
                                       description="Files present, final loss finite, the LoRA adapter loads.")])
    def checkpoint(context: AssetExecutionContext, store: StoreResource,
                   pipes: PipesSubprocessClient) -> MaterializeResult:
        def train(plan: TrainPlan) -> dict:
            env = {**os.environ, "SAND_TRAIN_SPEC": plan.spec.to_json()}
            command = training_command(exp)
            reports = pipes.run(command=command, context=context, env=env).get_custom_messages()
            if len(reports) != 1:  # rank 0 alone reports, whatever the launcher
                raise Failure(description=f"{exp.name}: the training child ({' '.join(command)}) reported its "
                                          f"metrics {len(reports)} times, expected once")
            return reports[0]

        db = store.store()
        result = stages.finetune(exp, db, k, lineage_of(context), train, context.log.info, control=control)
        written = result.written["checkpoints"]
        row = written.rows.row(0, named=True)
        curve = "\n".join(f"| {r['step']} | {r['loss']:.4f} |" for r in row["loss_curve"])
        return MaterializeResult(
            data_version=DataVersion(written.ref.version),
            check_results=[check_result("checkpoint_usable", checkpoint_problems(db, row))],
            metadata={"path": MetadataValue.path(str(db.resolve(row["path"]))), **result.counts,
                      "loss_curve": MetadataValue.md("| step | loss |\n|---|---|\n" + curve)})

    return checkpoint


def evaluation_asset(exp: Experiment, agent: str, iteration: int | None, key: AssetKey, deps: list,
                     description: str, control: bool = False) -> AssetsDefinition:
    """Greedy episodes of `agent` on the evaluation splits; per-episode rows land in `evaluations`."""

    @asset(key=key, group_name=exp.name, deps=[*deps, *evaluation_data(exp)], pool="gpu", kinds={"python"},
           code_version=stages.stage_code("evaluation"), description=description,
           check_specs=[AssetCheckSpec("episodes_complete", asset=key, blocking=True,
                                       description="Every planned episode has its row.")])
    def evaluation(context: AssetExecutionContext, store: StoreResource, compute: ComputeResource,
                   sciworld: SciWorldResource, alfworld: AlfWorldResource) -> MaterializeResult:
        result = stages.evaluate_agent(exp, store.store(), agent, iteration, backends(exp, compute),
                                       environments(sciworld, alfworld), lineage_of(context),
                                       stages.stage_code("evaluation"), context.log.info, control=control)
        missing = [f"{env} {split} {task}" for env, split, task in stages.missing_episodes(result)]
        return dataset_result(result.written["evaluations"], checks=(
            check_result("episodes_complete", missing, planned=len(result.planned)),), **result.counts)

    return evaluation


def build_model_assets(exp: Experiment) -> list[AssetsDefinition]:
    prefix = exp.name

    @asset(key=base_model_key(exp), group_name=prefix, kinds={"pytorch"},
           code_version=code_version("sand.models.registry"),
           description=f"The base model of {prefix} ({exp.base_model}): weights resolved and hashed.")
    def base_model(context: AssetExecutionContext) -> MaterializeResult:
        from sand.models.registry import model_hash, resolve_model

        path = resolve_model(exp.base_model)
        digest = model_hash(path)
        context.log.info(f"{exp.base_model} -> {path} ({digest})")
        return MaterializeResult(data_version=DataVersion(digest), metadata={
            "name": exp.base_model, "path": MetadataValue.path(str(path)), "weights_hash": digest})

    d0_key = AssetKey([prefix, "d0"])

    @asset(key=d0_key, group_name=prefix, deps=[expert_trajectories], kinds={"python", "parquet"},
           code_version=stages.stage_code("d0"),
           check_specs=[AssetCheckSpec(D_K_CHECK, asset=d0_key, blocking=True,
                                       description="D_0's schema and content (sand.validation).")],
           description="D_0: the experiment's share of the expert set (`train_data`).")
    def d0(context: AssetExecutionContext, store: StoreResource) -> MaterializeResult:
        written = stages.select_d0(exp, store.store(), lineage_of(context)).written["trajectories"]
        return dataset_result(written, checks=(check_result(D_K_CHECK, trajectory_problems(written.rows)),))

    sft_checkpoint = finetune_asset(exp, 0, AssetKey([prefix, "sft_checkpoint"]), deps=[base_model, d0],
                                    description="pi_0: behaviour initialisation, SFT of the base model on D_0.")
    base_evaluation = evaluation_asset(
        exp, "base", None, AssetKey([prefix, "base_evaluation"]), deps=[base_model],
        description="The prompted base model, greedy, on the evaluation splits (the floor SFT must beat).")
    sft_evaluation = evaluation_asset(exp, "sft", 0, AssetKey([prefix, "iter_0", "evaluation"]), deps=[sft_checkpoint],
                                      description="pi_0 (SFT), greedy, on the evaluation splits.")
    return [base_model, d0, sft_checkpoint, base_evaluation, sft_evaluation]
