"""Checkpoints: what identifies one (everything its training depends on), how its training is launched, the
row the `checkpoints` table keeps, and what a usable checkpoint folder holds."""
from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from sand.experiment import Experiment
from sand.machine import native_bf16
from sand.models.registry import model_hash, resolve_model
from sand.store import DatasetRef, Store
from sand.training.sft import TrainSpec
from sand.versioning import code_version


def checkpoint_dataset(exp: Experiment, iteration: int, control: bool = False) -> str:
    """pi_iteration's dataset in `checkpoints` (0: the SFT agent), or with `control` that of its compute-matched
    control (pi_{iteration-1} trained on D_{iteration-1} for as many steps)."""
    if control:
        return f"{exp.name}/control_{iteration}"
    return f"{exp.name}/sft" if iteration == 0 else f"{exp.name}/iter_{iteration}"


@dataclass(frozen=True)
class TrainPlan:
    """One training run: its spec (the output folder is named by everything that made it, not by the
    experiment, so experiments that would train the same thing share it) and what it trains on."""

    spec: TrainSpec
    data: DatasetRef
    base_model_hash: str

    @property
    def output(self) -> Path:
        return Path(self.spec.output_dir)


def plan_training(exp: Experiment, store: Store, iteration: int, data: DatasetRef, init: str | None,
                  max_steps: int | None = None) -> TrainPlan:
    """The training that makes pi_iteration from `init` on `data`; `max_steps` (a control's: the steps of the
    training it matches) overrides the experiment's."""
    base = resolve_model(exp.base_model)
    base_hash = model_hash(base)
    epochs = exp.train.epochs_of(iteration)
    train = exp.train.model_dump(exclude={"epochs", "iteration_epochs", "launcher"})
    if max_steps is not None:
        train["max_steps"] = max_steps
    # The precision it trains in, as this machine chooses it where the experiment does not: bf16 and fp32 training
    # make different weights, so they are different checkpoints.
    train["bf16"] = native_bf16() if train["bf16"] is None else train["bf16"]
    # pi_{k-1}'s folder as SAND_HOME-relative: a moved or copied home finds the same plan trained.
    start = store.relative(init) if init else None
    identity = json.dumps({"base": base_hash, "data": data.version, "init": start, "epochs": epochs, "train": train,
                           "code": code_version("sand.training.sft", "sand.react", prompts=True)}, sort_keys=True)
    output = store.home / "checkpoints" / hashlib.sha256(identity.encode()).hexdigest()[:16]
    spec = TrainSpec(base_model=str(base), data=[str(store.path(data))], output_dir=str(output),
                     init_checkpoint=init, epochs=epochs, **train)
    return TrainPlan(spec, data, base_hash)


def training_command(exp: Experiment) -> list[str]:
    """The child process that trains (the experiment's launcher, e.g. accelerate, or this Python); it reads the
    TrainSpec from SAND_TRAIN_SPEC. A launcher named without a folder is the one installed beside this Python
    where there is one: Dagster is often started as `.venv/bin/dagster` without activating the environment, and
    the launcher must run the environment's own torch."""
    if not exp.train.launcher:
        return [sys.executable, "-m", "sand.training.pipes_main"]
    program, *args = exp.train.launcher
    beside = Path(sys.executable).parent / program
    if Path(program).name == program and beside.is_file():
        program = str(beside)
    return [program, *args, "-m", "sand.training.pipes_main"]


def checkpoint_row(exp: Experiment, plan: TrainPlan, asset: str, iteration: int, metrics: dict) -> dict:
    """The `checkpoints` row of a finished training run (`metrics`: what sand.training.sft.train returns)."""
    return {
        "experiment": exp.name, "asset": asset, "iteration": iteration, "path": str(plan.output),
        "lora": exp.train.lora, "base_model": plan.spec.base_model, "base_model_hash": plan.base_model_hash,
        "init_checkpoint": plan.spec.init_checkpoint, "train_data": [vars(plan.data)],
        "examples": metrics["examples"], "train_steps": metrics["steps"], "final_loss": metrics["final_loss"],
        "seconds": metrics["seconds"], "tokens_per_second": metrics["tokens_per_second"],
        "loss_curve": [{"step": r["step"], "loss": r["loss"]} for r in metrics["loss_curve"]],
    }


def checkpoint_problems(store: Store, row: dict) -> list[str]:
    """What is wrong with the folder of a `checkpoints` row (empty: usable): files missing, a loss that is not
    a finite number, a LoRA adapter peft cannot load onto its base model (loaded on the meta device: the check
    reads the adapter's weights but no base weights, so it is cheap for any model size)."""
    folder = store.resolve(row["path"])
    needed = ["adapter_config.json", "adapter_model.safetensors"] if row["lora"] else ["config.json"]
    problems = [f"{folder}: no {name}" for name in needed if not (folder / name).is_file()]
    if not row["lora"] and not any(folder.glob("*.safetensors")):
        problems.append(f"{folder}: no *.safetensors weights")
    if row["final_loss"] is None or not math.isfinite(row["final_loss"]):
        problems.append(f"final loss is {row['final_loss']}")
    if row["lora"] and not problems:
        try:
            _load_adapter_on_meta(row["base_model"], folder)
        except Exception as error:  # noqa: BLE001 - any failure to load is the finding
            problems.append(f"{folder}: peft cannot load the adapter onto {row['base_model']}: {error}")
    return problems


def _load_adapter_on_meta(base: str, adapter: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    PeftModel.from_pretrained(model, str(adapter), low_cpu_mem_usage=True)
