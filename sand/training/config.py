"""Training hyperparameters: the `train:` section of an experiment file.

Its own module so that the checkpoint key (`sand.models.checkpoints.plan_training`), which covers the code
training runs, covers these fields and not the rest of the experiment schema.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TrainConfig(BaseModel):
    """Hyperparameters of one SFT run (see sand.training.sft.TrainSpec); paper: full FT, lr 1e-5, batch 64."""

    model_config = ConfigDict(extra="forbid")

    lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    learning_rate: float = 5e-4
    epochs: float = 1.0  # SFT of the base model (pi_0)
    # SAND iteration k trains iteration_epochs[k-1] epochs, the last entry repeating (paper: [3, 1]).
    iteration_epochs: list[float] = Field(default=[1.0], min_length=1)
    max_steps: int = -1
    per_device_batch_size: int = 2
    gradient_accumulation_steps: int = 2
    max_length: int = 1024
    history_steps: int | None = 8
    bf16: bool | None = None  # None: bf16 where the GPU or CPU computes it natively
    launcher: list[str] = Field(default_factory=list,
                                description="prefix of the training command, e.g. [accelerate, launch, "
                                            "--config_file, configs/accelerate/deepspeed_zero3.yaml]")

    def epochs_of(self, iteration: int) -> float:
        """Epochs of the training that makes pi_iteration (0: SFT)."""
        if iteration == 0:
            return self.epochs
        return self.iteration_epochs[min(iteration, len(self.iteration_epochs)) - 1]
