"""Per-experiment model assets: the base model, behaviour initialisation (SFT) and evaluations.

Built by a factory from each experiments/*.yaml, under the experiment's key prefix:
  <exp>/base_model ─► <exp>/base_evaluation
  <exp>/base_model + expert_trajectories ─► <exp>/sft_checkpoint (pi_0) ─► <exp>/iter_0/evaluation
Training runs in a child process through Dagster Pipes (`python -m sand.training.pipes_main`, or the
experiment's launcher such as `accelerate launch`); checkpoints are folders the trainer writes,
never pickled values.
"""
import hashlib
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import polars as pl
from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    PipesSubprocessClient,
    asset,
)

from resources import AlfWorldResource, ComputeResource, SciWorldResource, StoreResource
from sand.datasets import EXPERT
from sand.experiment import Experiment
from sand.models.backends import serves_adapters_merged
from sand.selection import spread_tasks, training_subset
from sand.store import DatasetRef, Store
from sand.training.sft import TrainSpec
from sand.versioning import code_version
from sand.worklog import WorkLog
from sand_assets.common import dataset_result, env_factory, lineage_for, work_dir
from sand_assets.expert_data import alfworld_heldout_games, expert_trajectories


def base_model_key(exp: Experiment) -> AssetKey:
    return AssetKey([exp.name, "base_model"])


def checkpoint_dataset(exp: Experiment, iteration: int) -> str:
    return f"{exp.name}/sft" if iteration == 0 else f"{exp.name}/iter_{iteration}"


def evaluation_data(exp: Experiment) -> list:
    """Game assets the experiment's evaluation splits read besides the released ones."""
    alfworld = exp.evaluation.envs.get("alfworld")
    return [alfworld_heldout_games] if alfworld and "heldout" in alfworld.splits else []


def make_backend_for(exp: Experiment, compute: ComputeResource, model: str | None = None):
    """The experiment's backend on `model` (default: the base model)."""
    from sand.models.backends import make_backend
    from sand.models.registry import resolve_model

    compute.apply()
    options = dict(exp.backend.options)
    if exp.backend.kind == "openai":
        options.setdefault("model", model or exp.base_model)
        return make_backend("openai", **options)
    if exp.backend.kind == "transformers" and compute.device != "auto":
        options.setdefault("device", compute.device)
    return make_backend(exp.backend.kind, model_path=resolve_model(model or exp.base_model), **options)


def agent_identity(exp: Experiment, checkpoint_path: str | None) -> str:
    """What the agent's weights are: the base model's hash, or the checkpoint folder (named by its training)."""
    from sand.models.registry import model_hash, resolve_model

    if checkpoint_path is None:
        return f"base@{model_hash(resolve_model(exp.base_model))}"
    return Path(checkpoint_path).name


@contextmanager
def agent_backend(exp: Experiment, compute: ComputeResource, store: Store, checkpoint: DatasetRef | None):
    """(backend, adapter) acting as the agent of `checkpoint` (None: the base model).

    A LoRA checkpoint is an adapter on the base model's backend, or, where adapters are slow to serve, a
    merged model of its own; a fully finetuned one is a model of its own. (The frozen base model, critic
    and writer, then needs a second backend.)"""
    if checkpoint is None:
        with make_backend_for(exp, compute) as backend:
            yield backend, None
        return
    row = store.read("checkpoints", checkpoint.dataset, checkpoint.version).row(0, named=True)
    if row["lora"] and serves_adapters_merged(exp.backend.kind):
        from sand.models.registry import merged_model

        with make_backend_for(exp, compute, str(merged_model(exp.base_model, row["path"]))) as backend:
            yield backend, None
        return
    with make_backend_for(exp, compute, None if row["lora"] else row["path"]) as backend:
        yield backend, (row["path"] if row["lora"] else None)


def train_checkpoint(context: AssetExecutionContext, exp: Experiment, store: Store, iteration: int,
                     data: DatasetRef, init: str | None, pipes: PipesSubprocessClient) -> MaterializeResult:
    """Train (or find already trained) the checkpoint of `iteration` on `data`; record it."""
    from sand.models.registry import model_hash, resolve_model

    base = resolve_model(exp.base_model)
    base_hash = model_hash(base)
    epochs = exp.train.epochs_of(iteration)
    train = exp.train.model_dump(exclude={"epochs", "iteration_epochs", "launcher"})
    identity = json.dumps({"base": base_hash, "data": data.version, "init": init, "epochs": epochs, "train": train,
                           "code": code_version("sand.training.sft", "sand.react", prompts=True)}, sort_keys=True)
    version = hashlib.sha256(identity.encode()).hexdigest()[:16]
    # Named by what made it, not by experiment: experiments that would train the same thing share it.
    output = store.home / "checkpoints" / version
    spec = TrainSpec(base_model=str(base), data=[str(store.path(data))],
                     output_dir=str(output), init_checkpoint=init, epochs=epochs, **train)
    command = [*exp.train.launcher, "-m", "sand.training.pipes_main"] if exp.train.launcher \
        else [sys.executable, "-m", "sand.training.pipes_main"]
    context.log.info(f"training {output} on {data.dataset}@{data.version} ({' '.join(command)})")
    env = {**os.environ, "SAND_TRAIN_SPEC": spec.to_json()}
    metrics = pipes.run(command=command, context=context, env=env).get_custom_messages()[-1]
    row = {
        "experiment": exp.name, "asset": context.asset_key.to_user_string(), "iteration": iteration,
        "path": str(output), "lora": exp.train.lora, "base_model": str(base), "base_model_hash": base_hash,
        "init_checkpoint": init, "train_data": [vars(data)], "examples": metrics["examples"],
        "train_steps": metrics["steps"], "final_loss": metrics["final_loss"], "seconds": metrics["seconds"],
        "tokens_per_second": metrics["tokens_per_second"],
        "loss_curve": [{"step": r["step"], "loss": r["loss"]} for r in metrics["loss_curve"]],
    }
    written = store.write("checkpoints", checkpoint_dataset(exp, iteration), pl.DataFrame([row]),
                          lineage_for(context, iteration=iteration, inputs=[data],
                                      metadata={"checkpoint": str(output), "base_model_hash": base_hash}))
    curve = "\n".join(f"| {r['step']} | {r['loss']:.4f} |" for r in metrics["loss_curve"])
    return MaterializeResult(data_version=DataVersion(written.ref.version), metadata={
        "path": MetadataValue.path(str(output)), "examples": metrics["examples"], "train_steps": metrics["steps"],
        "final_loss": metrics["final_loss"], "seconds": metrics["seconds"],
        "tokens_per_second": metrics["tokens_per_second"], "resumed": metrics.get("resumed", False),
        "loss_curve": MetadataValue.md("| step | loss |\n|---|---|\n" + curve),
    })


def run_evaluation(context: AssetExecutionContext, exp: Experiment, store: Store, compute: ComputeResource,
                   sciworld: SciWorldResource, alfworld: AlfWorldResource, agent: str, iteration: int | None,
                   checkpoint: DatasetRef | None) -> MaterializeResult:
    """Greedy episodes of `agent` on the experiment's evaluation splits; per-episode rows land in `evaluations`."""
    from sand.evaluation import evaluate

    rows = []
    # Finished episodes are reused for the same agent weights, backend and evaluation settings.
    path = store.read("checkpoints", checkpoint.dataset, checkpoint.version)["path"][0] if checkpoint else None
    work = work_dir(context, store, "evaluation", agent=agent_identity(exp, path),
                    backend=exp.backend.model_dump(), settings=exp.evaluation.model_dump())
    with agent_backend(exp, compute, store, checkpoint) as (backend, adapter):
        for env_name, cfg in exp.evaluation.envs.items():
            factory = env_factory(env_name, sciworld, alfworld, **(
                {"task_names": cfg.task_names, "variations_per_task": cfg.variations_per_task}
                if env_name == "sciworld" else {}))
            with factory() as lister:
                tasks = [t for split in cfg.splits for t in spread_tasks(lister.tasks(split), cfg.tasks_per_split)]
            context.log.info(f"{agent}: {len(tasks)} {env_name} episodes on {', '.join(cfg.splits)}")
            records = evaluate(backend, factory, tasks, adapter=adapter, pool_size=exp.evaluation.pool_size,
                               history_steps=exp.evaluation.history_steps, max_steps=cfg.max_steps,
                               max_new_tokens=exp.evaluation.max_new_tokens,
                               log=WorkLog(work / env_name))
            rows += [{**vars(r), "experiment": exp.name, "agent": agent, "iteration": iteration,
                      "checkpoint": checkpoint.version if checkpoint else None} for r in records]
    df = pl.DataFrame(rows)
    dataset = f"{exp.name}/{agent}"
    written = store.write("evaluations", dataset, df, lineage_for(
        context, iteration=iteration, inputs=[checkpoint] if checkpoint else [], metadata={"agent": agent}))
    summary = store.sql(f"select env, split, episodes, avg_reward, success_rate, format_error_rate, tokens_per_task "
                        f"from evaluation_summary where experiment = '{exp.name}' and agent = '{agent}'")
    flat = {f"{r['env']}/{r['split']}/avg_reward": r["avg_reward"] for r in summary.iter_rows(named=True)}
    return dataset_result(written, **flat)


def build_model_assets(exp: Experiment) -> list[AssetsDefinition]:
    prefix = exp.name
    model_code = code_version("sand.models.registry")

    @asset(key=base_model_key(exp), group_name=prefix, kinds={"pytorch"}, code_version=model_code,
           description=f"The base model of {prefix} ({exp.base_model}): weights resolved and hashed.")
    def base_model(context: AssetExecutionContext) -> MaterializeResult:
        from sand.models.registry import model_hash, resolve_model

        path = resolve_model(exp.base_model)
        digest = model_hash(path)
        context.log.info(f"{exp.base_model} -> {path} ({digest})")
        return MaterializeResult(data_version=DataVersion(digest), metadata={
            "name": exp.base_model, "path": MetadataValue.path(str(path)), "weights_hash": digest})

    @asset(key=AssetKey([prefix, "sft_checkpoint"]), group_name=prefix, kinds={"pytorch"}, pool="gpu",
           deps=[base_model, expert_trajectories],
           code_version=code_version("sand.training.sft", "sand.selection", "sand.react", prompts=True),
           description="pi_0: behaviour initialisation, SFT of the base model on its share of D_0.")
    def sft_checkpoint(context: AssetExecutionContext, store: StoreResource,
                       pipes: PipesSubprocessClient) -> MaterializeResult:
        db = store.store()
        d0 = training_subset(db.read("trajectories", EXPERT), exp.train_data)
        data = db.write("trajectories", f"{prefix}/d0", d0,
                        lineage_for(context, iteration=0, inputs=[db.head("trajectories", EXPERT)])).ref
        return train_checkpoint(context, exp, db, 0, data, None, pipes)

    eval_code = code_version("sand.evaluation", "sand.rollout", "sand.react", "sand.selection", prompts=True)

    @asset(key=AssetKey([prefix, "base_evaluation"]), group_name=prefix, kinds={"python"}, pool="gpu",
           deps=[base_model, *evaluation_data(exp)], code_version=eval_code,
           description="The prompted base model, greedy, on the evaluation splits (the floor SFT must beat).")
    def base_evaluation(context: AssetExecutionContext, store: StoreResource, compute: ComputeResource,
                        sciworld: SciWorldResource, alfworld: AlfWorldResource) -> MaterializeResult:
        return run_evaluation(context, exp, store.store(), compute, sciworld, alfworld, "base", None, None)

    @asset(key=AssetKey([prefix, "iter_0", "evaluation"]), group_name=prefix, kinds={"python"}, pool="gpu",
           deps=[sft_checkpoint, *evaluation_data(exp)], code_version=eval_code,
           description="pi_0 (SFT), greedy, on the evaluation splits.")
    def sft_evaluation(context: AssetExecutionContext, store: StoreResource, compute: ComputeResource,
                       sciworld: SciWorldResource, alfworld: AlfWorldResource) -> MaterializeResult:
        db = store.store()
        return run_evaluation(context, exp, db, compute, sciworld, alfworld, "sft", 0,
                              db.head("checkpoints", checkpoint_dataset(exp, 0)))

    return [base_model, sft_checkpoint, base_evaluation, sft_evaluation]
