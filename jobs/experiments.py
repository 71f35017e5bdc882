"""One job per experiment: its assets and the expert data they stand on."""
from dagster import AssetSelection, define_asset_job
from pydantic import ValidationError

from resources import AlfWorldResource, ComputeResource, SciWorldResource, StoreResource
from sand.errors import SandError
from sand.experiment import Experiment
from sand_assets.expert_data import (
    alfworld_heldout_games,
    alfworld_source_trajectories,
    alfworld_training_games,
    imported_trajectories,
    sciworld_source_trajectories,
)
from sand_assets.models import evaluation_data

RESOURCES = {"alfworld": AlfWorldResource, "sciworld": SciWorldResource, "compute": ComputeResource,
             "store": StoreResource}


def experiment_job(exp: Experiment):
    """`sand run <name>`: expert data (inbox imports excepted: they run per file; an environment's sources only
    when the experiment trains on it, held-out games only when it evaluates on them) then the experiment, with
    the experiment's resource settings."""
    sources = {"alfworld": {alfworld_training_games, alfworld_source_trajectories},
               "sciworld": {sciworld_source_trajectories}}
    unused = {alfworld_heldout_games} - set(evaluation_data(exp))
    unused |= {a for env, assets in sources.items() if env not in exp.train_data for a in assets}
    selection = AssetSelection.groups("expert_data", exp.name) - AssetSelection.assets(imported_trajectories, *unused)
    return define_asset_job(exp.name, selection=selection, description=exp.description or None,
                            config=job_config(exp))


def job_config(exp: Experiment) -> dict | None:
    """The job's run config: `exp.resources`, checked field by field (a typo must not fall back to a default),
    and, where the experiment trains on some ScienceWorld task types only, gold paths recorded for those alone
    (the other types' paths would take most of the recording and never reach its D_0)."""
    where = f"experiment {exp.name}"
    for name, settings in exp.resources.items():
        kind = RESOURCES.get(name)
        if kind is None:
            raise SandError(f"{where}: resources.{name}: no such resource (one of {', '.join(RESOURCES)})")
        unknown = sorted(set(settings) - set(kind.model_fields))
        if unknown:
            raise SandError(f"{where}: resources.{name}: unknown settings {unknown} "
                            f"(known: {', '.join(kind.model_fields)})")
        try:
            kind(**settings)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise SandError(f"{where}: resources.{name}: {problems}") from None
    config = {}
    if exp.resources:
        config["resources"] = {name: {"config": settings} for name, settings in exp.resources.items()}
    if exp.train_tasks.get("sciworld"):
        config["ops"] = {sciworld_source_trajectories.op.name: {"config": {"tasks": exp.train_tasks["sciworld"]}}}
    return config or None
