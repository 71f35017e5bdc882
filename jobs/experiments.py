"""One job per experiment: its assets and the expert data they stand on."""
from dagster import AssetSelection, define_asset_job

from sand.experiment import Experiment
from sand_assets.expert_data import imported_trajectories


def experiment_job(exp: Experiment):
    """`sand run <name>`: expert data (inbox imports excepted: they run per file) then the experiment."""
    selection = AssetSelection.groups("expert_data", exp.name) - AssetSelection.assets(imported_trajectories)
    return define_asset_job(exp.name, selection=selection, description=exp.description or None)
