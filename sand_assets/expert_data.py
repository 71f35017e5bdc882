"""Expert trajectories D_0 and their sources: ScienceWorld gold paths, ALFWorld experts, ETO imports."""

import hashlib
from pathlib import Path

from dagster import (
    AssetCheckResult,
    AssetExecutionContext,
    AutomationCondition,
    Config,
    DataVersion,
    DynamicPartitionsDefinition,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
    asset_check,
)
from pydantic import Field

from resources import AlfWorldResource, SciWorldResource, StoreResource
from sand import datasets
from sand.envs.base import Environment, TaskSpec
from sand.errors import SandError
from sand.experts import record_experts
from sand.formats import resolve
from sand.trajectory import Trajectory, from_frame, to_frame
from sand.validation import trajectory_problems
from sand.versioning import code_version
from sand.worklog import WorkLog
from sand_assets.common import dataset_result, lineage_for, work_dir

GROUP = "expert_data"

# One partition per trajectory file dropped into SAND_HOME/inbox/<env>/; key "<env>/<file name>".
eto_inbox_partitions = DynamicPartitionsDefinition(name="eto_inbox")


def _progress(context: AssetExecutionContext, total: int, every: int = 10):
    def log(i: int, t: Trajectory) -> None:
        if (i + 1) % every == 0 or i + 1 == total:
            context.log.info(f"{i + 1}/{total} expert trajectories recorded (last: {t.task_id}, reward {t.reward})")
    return log


def _record(context: AssetExecutionContext, store: StoreResource, env: Environment, tasks: list[TaskSpec],
            source: str, **key) -> list[Trajectory]:
    """The expert's trajectories on `tasks`, each written to a work log as it is recorded: a rerun, or a run
    resumed after an interruption, replays only the tasks not recorded yet (`key`: what shapes a recording)."""
    log = WorkLog(work_dir(context, store.store(), "experts", env=env.name, source=source, **key))
    done = {t.task_id: t for t in from_frame(log.frame())} if log.exists() else {}
    todo = [t for t in tasks if t.task_id not in done]
    if len(todo) < len(tasks):
        context.log.info(f"{len(tasks) - len(todo)} of {len(tasks)} expert trajectories were recorded before")
    report = _progress(context, len(todo))

    def persist(i: int, trajectory: Trajectory) -> None:
        log.append(to_frame([trajectory]))
        done[trajectory.task_id] = trajectory
        report(i, trajectory)

    record_experts(env, todo, source, persist)
    return [done[t.task_id] for t in tasks]


def _keep_successes(context: AssetExecutionContext, trajectories: list[Trajectory]) -> tuple[list[Trajectory], int]:
    """Demonstrations must succeed; a failing expert run is reported, not trained on."""
    kept = []
    for t in trajectories:
        if t.reward is not None and t.reward >= 1.0:
            kept.append(t)
        else:
            context.log.warning(f"expert did not solve {t.task_id} (reward {t.reward}); left out")
    return kept, len(trajectories) - len(kept)


class SciWorldExpertConfig(Config):
    split: str = Field("train", description="ScienceWorld variation split the demonstrations come from")
    tasks: list[str] = Field(default_factory=list, description="task names; empty means all 30")
    variations_per_task: int = Field(2, description="first N variations of each task in the split")


@asset(group_name=GROUP, kinds={"python", "parquet"},
       code_version=code_version("sand.envs.sciworld", "sand.experts", "sand.datasets"))
def sciworld_source_trajectories(context: AssetExecutionContext, config: SciWorldExpertConfig,
                                 sciworld: SciWorldResource, store: StoreResource) -> MaterializeResult:
    """ScienceWorld demonstrations: the environment's gold action paths, executed in the real JVM."""
    with sciworld.open(config.tasks, config.variations_per_task) as env:
        tasks = env.tasks(config.split)
        context.log.info(f"recording gold paths for {len(tasks)} ScienceWorld variations ({config.split})")
        recorded = _record(context, store, env, tasks, "gold", split=config.split,
                           simplifications=sciworld.simplifications)
    kept, dropped = _keep_successes(context, recorded)
    lineage = lineage_for(context, metadata=config.model_dump())
    written = datasets.write_source(store.store(), "sciworld", kept, lineage)
    return dataset_result(written, expert_failures=dropped)


def _generated_games(context: AssetExecutionContext, folder: Path, n: int, seed: int) -> MaterializeResult:
    from sand.envs.alfworld_gen import generate_games

    games = generate_games(folder, n=n, seed=seed)
    digest = hashlib.sha256()
    for game in sorted(games):
        digest.update(game.name.encode() + (Path(game) / "game.tw-pddl").read_bytes())
    context.log.info(f"{len(games)} games in {folder}")
    return MaterializeResult(data_version=DataVersion(digest.hexdigest()[:16]),
                             metadata={"games": len(games), "seed": seed, "path": MetadataValue.path(str(folder))})


@asset(group_name=GROUP, kinds={"python"}, code_version=code_version("sand.envs.alfworld_gen"))
def alfworld_training_games(context: AssetExecutionContext, alfworld: AlfWorldResource) -> MaterializeResult:
    """ALFWorld training games generated offline from PDDL (all six task types, classic wording)."""
    return _generated_games(context, alfworld.train_games_dir, alfworld.train_games, alfworld.train_seed)


@asset(group_name=GROUP, kinds={"python"}, code_version=code_version("sand.envs.alfworld_gen"))
def alfworld_heldout_games(context: AssetExecutionContext, alfworld: AlfWorldResource) -> MaterializeResult:
    """The `heldout` evaluation split: generated like the training games, from another seed, never trained on."""
    if alfworld.heldout_seed == alfworld.train_seed:
        raise Failure(description=f"AlfWorldResource: heldout_seed {alfworld.heldout_seed} equals train_seed: "
                                  "held-out games would be the training games")
    return _generated_games(context, alfworld.heldout_games_dir, alfworld.heldout_games, alfworld.heldout_seed)


@asset(group_name=GROUP, deps=[alfworld_training_games], kinds={"python", "parquet"},
       code_version=code_version("sand.envs.alfworld", "sand.envs.alfworld_expert", "sand.experts", "sand.datasets"))
def alfworld_source_trajectories(context: AssetExecutionContext, alfworld: AlfWorldResource,
                                 store: StoreResource) -> MaterializeResult:
    """ALFWorld demonstrations on the generated training games, by the configured expert."""
    with alfworld.open() as env:
        try:  # the configured games only: the folder keeps games made for a larger `train_games`
            tasks = env.tasks("train")
        except SandError as exc:
            raise Failure(description=str(exc)) from None
        context.log.info(f"recording the {alfworld.expert} expert on {len(tasks)} ALFWorld training games")
        recorded = _record(context, store, env, tasks, alfworld.expert, max_steps=alfworld.max_steps,
                           seed=alfworld.train_seed, games_code=code_version("sand.envs.alfworld_gen"))
    kept, dropped = _keep_successes(context, recorded)
    lineage = lineage_for(context, metadata={"expert": alfworld.expert, "games": alfworld.train_games,
                                             "seed": alfworld.train_seed})
    written = datasets.write_source(store.store(), "alfworld", kept, lineage)
    return dataset_result(written, expert_failures=dropped)


def resolution_metadata(written) -> dict[str, int]:
    """Counts of imported trajectories matched to their task, replayed faithfully, diverged, unmatched (and
    pending), per environment: `resolution/<env>/<count>`."""
    return {f"resolution/{env}/{name}": n for env, c in resolve.counts(from_frame(written.rows)).items()
            for name, n in c.items()}


class ImportConfig(Config):
    path: str | None = Field(None, description="the file to import instead of the partition's inbox file "
                                               "(`sand import`); its name must be the partition's file name")
    resolve: bool = Field(True, description="match each trajectory to its task and verify it by replay; false "
                                            "marks them pending (`sand resolve` does it later)")


@asset(group_name=GROUP, partitions_def=eto_inbox_partitions, kinds={"python", "parquet"},
       code_version=code_version("sand.formats.eto", "sand.formats.resolve", "sand.datasets", "sand.store",
                                 "sand.envs.sciworld", "sand.envs.alfworld", prompts=True))
def imported_trajectories(context: AssetExecutionContext, config: ImportConfig, store: StoreResource,
                          sciworld: SciWorldResource, alfworld: AlfWorldResource) -> MaterializeResult:
    """A trajectory file (ETO/ShareGPT or chat messages; JSON, JSONL or Parquet: sand.formats.eto) from the inbox
    (or the run config's `path`: `sand import`), validated record by record (a bad file stores nothing); each
    trajectory is matched to its environment task and verified by replay."""
    env, name = context.partition_key.split("/", 1)
    path = Path(config.path) if config.path else store.inbox(env) / name
    if path.name != name:
        raise Failure(description=f"{path}: partition {context.partition_key} imports a file named {name}")
    lineage = lineage_for(context)
    open_env = (lambda e: sciworld.open() if e == "sciworld" else alfworld.open()) if config.resolve else None
    try:
        written = datasets.import_eto(store.store(), path, env, lineage, open_env=open_env)
    except SandError as exc:
        raise Failure(description=str(exc)) from None
    return dataset_result(written, new_version=written.created, **resolution_metadata(written))


@asset(group_name=GROUP, kinds={"python", "parquet"},
       deps=[sciworld_source_trajectories, alfworld_source_trajectories, imported_trajectories],
       # D_0 follows any source that updates; sources never materialized (say, an import-only
       # setup with no ScienceWorld data) must not hold it back.
       automation_condition=AutomationCondition.eager().without(~AutomationCondition.any_deps_missing()),
       code_version=code_version("sand.datasets", "sand.store"))
def expert_trajectories(context: AssetExecutionContext, store: StoreResource) -> MaterializeResult:
    """D_0: every current source dataset as one expert set, the input of behaviour initialisation."""
    lineage = lineage_for(context, iteration=0)
    written = datasets.compose_expert(store.store(), lineage)
    context.log.info(f"expert set {written.ref.version}: {written.row_count} trajectories "
                     f"from {len(lineage.inputs)} sources")
    return dataset_result(written, sources=", ".join(f"{r.dataset}@{r.version}" for r in lineage.inputs),
                          **resolution_metadata(written))


@asset_check(asset=expert_trajectories, blocking=True)
def expert_trajectories_schema(store: StoreResource) -> AssetCheckResult:
    """Schema, unique ids, known envs, non-empty steps and actions, rewards in [0, 1]."""
    df = store.store().read("trajectories", datasets.EXPERT)
    problems = trajectory_problems(df)
    return AssetCheckResult(passed=not problems, metadata={"problems": MetadataValue.md(
        "\n".join(f"- {p}" for p in problems) or "none"), "rows": df.height})
