"""One job per experiment: its assets and the expert data they stand on."""
from dagster import AssetSelection, define_asset_job

from sand.experiment import Experiment
from sand_assets.expert_data import alfworld_heldout_games, imported_trajectories
from sand_assets.models import evaluation_data


def experiment_job(exp: Experiment):
    """`sand run <name>`: expert data (inbox imports excepted: they run per file; held-out games only when
    the experiment evaluates on them) then the experiment."""
    unused = {alfworld_heldout_games} - set(evaluation_data(exp))
    selection = AssetSelection.groups("expert_data", exp.name) - AssetSelection.assets(imported_trajectories, *unused)
    return define_asset_job(exp.name, selection=selection, description=exp.description or None)
