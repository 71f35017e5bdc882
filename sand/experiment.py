"""Experiments as YAML files: model, backend, data, training, evaluation and SAND settings.

One file in `experiments/` is one experiment; the Dagster code location builds one set of assets per
file (`<name>/sft_checkpoint`, `<name>/iter_1/candidate_samples`, ...). Every field has a default,
so a file names only what differs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sand.errors import SandError
from sand.training.config import TrainConfig
from sand.trajectory import ENVS

# Keys of the per-environment settings: a typo (`alfwrld`) is an error naming it, not an ignored entry.
EnvName = Literal[ENVS]

# `SAND_EXPERIMENTS` names another folder; by default the repository's experiments/.
EXPERIMENTS_DIR = Path(os.environ.get("SAND_EXPERIMENTS", Path(__file__).resolve().parent.parent / "experiments"))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BackendConfig(_Strict):
    kind: Literal["transformers", "vllm", "openai"] = "transformers"
    options: dict = Field(default_factory=dict, description="keyword options of the backend class")


class EnvEval(_Strict):
    splits: list[str]
    tasks_per_split: int | None = None  # first N tasks of each split (after task filtering)
    task_names: list[str] = Field(default_factory=list)  # ScienceWorld: restrict to these tasks
    variations_per_task: int | None = None  # ScienceWorld: first N variations of each task
    max_steps: int | None = None  # cap below the task's own limit (CPU budgets)
    max_invalid_streak: int | None = 10  # end an episode after this many consecutive invalid actions (None: never)
    task_max_steps: dict[str, int] = Field(default_factory=dict)  # task type -> a lower cap (MPO's per-task limits)


class EvalConfig(_Strict):
    envs: dict[EnvName, EnvEval] = Field(default_factory=lambda: {
        "alfworld": EnvEval(splits=["valid_seen", "valid_unseen"], tasks_per_split=10, max_steps=30),
        "sciworld": EnvEval(splits=["dev", "test"], variations_per_task=1, tasks_per_split=10, max_steps=30),
    })
    pool_size: int = 8
    history_steps: int | None = 8
    max_new_tokens: int = 96


class SandConfig(_Strict):
    iterations: int = 1
    n_samples: int = 5
    temperature: float = 1.0
    seed: int | None = 0  # of candidate sampling and rollouts (same inputs, same samples); None: unseeded
    rollout_max_steps: int | None = 15
    # The frozen critic and writer of deliberations: anything the model registry resolves (a folder, a hub name)
    # with its own backend settings; None: the agent's base model on the experiment's backend, as the paper.
    critic_model: str | None = None
    critic_backend: BackendConfig | None = None
    critic_max_new_tokens: int = 48  # the critic's insight on one candidate (its verdict is chosen, not written)
    writer_max_new_tokens: int = 192  # the writer's deliberation thought of one step
    self_consistency: bool = True  # ablation: False = the base model invents the alternatives
    critique: bool = True  # ablation: False = no rollouts, no critiques
    expert_switch: bool = False
    # Which uncertain steps get a deliberation: all ("uncertain", as the paper), or only those where executing the
    # candidates told them apart ("separated": some candidate's evidence verdict differs from the others').
    deliberate: Literal["uncertain", "separated"] = "uncertain"
    # How a deliberation written from the evidence (where the writer's own fails validation) speaks of each
    # candidate: its observation quoted and its outcome ("quotes"), or its outcome alone ("outcome").
    thought_form: Literal["quotes", "outcome"] = "quotes"
    # Beside each pi_k, its compute-matched control (agent control_k): pi_{k-1} trained on D_{k-1} unchanged for as
    # many optimizer steps as pi_k. iter_k vs control_k is SAND's effect; iter_k vs sft adds the extra training.
    control: bool = True
    # env -> how many of D_0's trajectories the iterations deliberate over (a stable pseudo-random N); None:
    # all of D_0, as the paper. D_k carries the others unchanged, so every iteration trains on all the data.
    # CPU budgets: the critique stage grows with this, training does not.
    trajectories: dict[EnvName, int | None] | None = None


class RetrainConfig(_Strict):
    on_new_data: bool = False  # retrain (SFT, the iterations, the evaluations) when D_0 gets a new version
    min_new_trajectories: int = Field(1, ge=1)  # ... with at least this many trajectories the trained one lacks


class Experiment(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="also the Dagster group and asset key prefix")
    description: str = ""
    base_model: str = "smollm2-135m"
    backend: BackendConfig = Field(default_factory=BackendConfig)
    train_data: dict[EnvName, int | None] = Field(default_factory=lambda: {"alfworld": None, "sciworld": None},
                                              description="env -> max trajectories of D_0 used (None: all)")
    train_tasks: dict[EnvName, list[str]] = Field(default_factory=dict,
                                                  description="env -> the task types D_0 draws from (absent: all)")
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluation: EvalConfig = Field(default_factory=EvalConfig)
    sand: SandConfig = Field(default_factory=SandConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)
    resources: dict[str, dict] = Field(default_factory=dict,
                                       description="settings of the shared resources in this experiment's job, "
                                                   "e.g. {alfworld: {train_games: 240}}")

    @model_validator(mode="after")
    def _tasks_of_trained_envs(self) -> Experiment:
        untrained = sorted(set(self.train_tasks) - set(self.train_data))
        if untrained:
            raise ValueError(f"train_tasks names {', '.join(untrained)}, which train_data does not train on")
        return self


def load_experiment(path: str | Path) -> Experiment:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SandError(f"{path}: cannot read experiment: {exc}") from None
    raw.setdefault("name", path.stem)
    try:
        return Experiment.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise SandError(f"{path}: invalid experiment: {problems}") from None


def load_experiments(folder: Path = EXPERIMENTS_DIR) -> list[Experiment]:
    experiments = [load_experiment(p) for p in sorted(folder.glob("*.yaml"))]
    names = [e.name for e in experiments]
    if len(set(names)) != len(names):
        raise SandError(f"{folder}: two experiments share a name: {names}")
    return experiments
