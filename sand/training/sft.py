"""Supervised finetuning on ReAct trajectories with TRL's SFTTrainer (LoRA or full).

Loss is on the agent's turns only: each example is a prompt (the header: the environment's instruction, ETO's
"OK" answer to it, the task) and a completion (the window's turns), and within the completion only assistant turns
(the chat template marks them with `{% generation %}`) carry loss. Long episodes are cut into windows of
`history_steps` steps, each starting with the header, so that training sees the same bounded history the agent is
prompted with; a window longer than `max_length`
tokens ends early, so every step is trained on once, with as much of its history as fits. Training writes into
`<output>.partial/` (with Trainer checkpoints, so an interrupted run resumes) and renames it to
`<output>` only when done: a checkpoint folder is complete or absent. Under a multi-process launcher every
rank trains and the main process alone completes the folder.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl
from pydantic import Field

from sand.errors import SandError
from sand.machine import native_bf16
from sand.react import HEADER_TURNS, conversation
from sand.training.config import TrainConfig
from sand.trajectory import Trajectory, from_frame


class TrainSpec(TrainConfig):
    """One training run: the experiment's hyperparameters (`epochs` is this run's: TrainConfig.epochs_of), what it
    reads and writes, and the trainer's settings no experiment changes."""

    base_model: str  # model folder
    data: list[str]  # Parquet files of trajectories
    output_dir: str
    init_checkpoint: str | None = None  # continue from this adapter (LoRA) or model folder (full)
    lora_dropout: float = 0.05
    lr_scheduler: str = "cosine"
    warmup: float = 0.03  # a fraction of training (< 1) or a number of steps
    seed: int = 0
    gradient_checkpointing: bool = False
    save_steps: int = 50
    extra_args: dict = Field(default_factory=dict)  # any other SFTConfig field (DeepSpeed config, ...)

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> TrainSpec:
        return cls.model_validate_json(text)


def training_examples(trajectories: list[Trajectory], history_steps: int | None,
                      length: Callable[[list[dict]], int] | None = None, max_length: int | None = None) -> list[dict]:
    """Conversational prompt-completion examples (`{"prompt": header, "completion": turns}`), one per window of at
    most `history_steps` steps. The header is never trained on: trained, its "OK" (repeated by every window) taught
    a small agent to answer the task with "OK" at its first step.

    With `length` (a conversation's tokens) and `max_length`, a window that would be longer ends early and the next
    one starts where it ended: the trainer cuts a long example's last turns off, so they would never be trained on
    (deliberation thoughts make D_k's windows much longer than D_0's)."""
    examples = []
    for t in trajectories:
        window = history_steps or max(len(t.steps), 1)
        start = 0
        while start < len(t.steps):
            end = min(start + window, len(t.steps))
            messages = conversation(t.env, t.instruction, t.steps[start:end], final_observation=False)
            while max_length and length(messages) > max_length:
                if end - start == 1:
                    raise SandError(f"{t.env} trajectory {t.id}, step {start + 1}: the instruction and this step "
                                    f"alone are {length(messages)} tokens, more than train.max_length {max_length}")
                end -= 1
                messages = conversation(t.env, t.instruction, t.steps[start:end], final_observation=False)
            examples.append({"prompt": messages[:HEADER_TURNS], "completion": messages[HEADER_TURNS:]})
            start = end
    return examples


def _load_model(spec: TrainSpec, bf16: bool):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if bf16 else torch.float32
    if not spec.lora:
        return AutoModelForCausalLM.from_pretrained(spec.init_checkpoint or spec.base_model, dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(spec.base_model, dtype=dtype)
    if spec.init_checkpoint:
        return PeftModel.from_pretrained(model, spec.init_checkpoint, is_trainable=True)
    config = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                        target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _scored_positions_trainer():
    """TRL's SFTTrainer, with a loss that projects only the positions predicting a trained token onto the vocabulary.

    TRL scores just those positions where Triton runs; on a CPU it scores every position (and its entropy), and
    with a 49k vocabulary and loss on the agent's turns alone that was most of a step (measured in
    benchmarks/training.py). The loss is TRL's: the summed log-likelihood of the trained tokens over their count
    in the accumulated batch, so steps and checkpoints mean the same."""
    import torch
    from trl import SFTTrainer

    class ScoredPositionsTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            targets = inputs["labels"][:, 1:]  # position t predicts token t + 1
            keep = (targets != -100).any(0).nonzero().squeeze(-1)
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=keep, use_cache=False)
            loss = torch.nn.functional.cross_entropy(outputs.logits.float().flatten(0, 1), targets[:, keep].flatten(),
                                                     ignore_index=-100, reduction="sum")
            count = (targets != -100).sum() if num_items_in_batch is None else num_items_in_batch
            loss = loss / torch.as_tensor(count).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # DDP averages the ranks' gradients, as in TRL
            return (loss, outputs) if return_outputs else loss

    return ScoredPositionsTrainer


def build_trainer(spec: TrainSpec, output_dir: Path, callbacks: list | None = None):
    """(TRL's SFTTrainer for `spec`, its data tokenized and labelled, writing its Trainer checkpoints under
    `output_dir`; how many trajectories the data holds)."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    bf16 = native_bf16() if spec.bf16 is None else spec.bf16
    trajectories = [t for path in spec.data for t in from_frame(pl.read_parquet(path))]
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model)
    examples = training_examples(trajectories, spec.history_steps, max_length=spec.max_length, length=lambda m: len(
        tokenizer.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"]))
    config = SFTConfig(
        output_dir=str(output_dir), assistant_only_loss=True, max_length=spec.max_length,
        num_train_epochs=spec.epochs, max_steps=spec.max_steps, learning_rate=spec.learning_rate,
        per_device_train_batch_size=spec.per_device_batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        lr_scheduler_type=spec.lr_scheduler, warmup_steps=spec.warmup, seed=spec.seed, bf16=bf16,
        gradient_checkpointing=spec.gradient_checkpointing, logging_steps=1, save_steps=spec.save_steps,
        save_total_limit=1, report_to=[], dataloader_num_workers=0, include_num_input_tokens_seen="non_padding",
        use_cpu=not torch.cuda.is_available(),  # Trainer refuses bf16 on a CPU unless told it is one
        **spec.extra_args,
    )
    # Where Triton scores only the trained positions (CUDA), TRL's own loss; on a CPU, the same loss over those alone.
    trainer_class = SFTTrainer if torch.cuda.is_available() else _scored_positions_trainer()
    trainer = trainer_class(model=_load_model(spec, bf16), args=config, train_dataset=Dataset.from_list(examples),
                            processing_class=tokenizer, callbacks=callbacks)
    return trainer, len(trajectories)


def train(spec: TrainSpec, log: Callable[[dict], None] = lambda record: None) -> dict:
    """Train, write the checkpoint folder, and return its metrics (loss curve, tokens, time)."""
    from transformers import TrainerCallback

    output = Path(spec.output_dir)
    if (output / "train_metrics.json").exists():  # already trained: the folder only appears when complete
        return json.loads((output / "train_metrics.json").read_text())
    partial = output.with_name(output.name + ".partial")
    curve: list[dict] = []

    class Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                record = {"step": state.global_step, "max_steps": state.max_steps, "loss": logs["loss"],
                          "learning_rate": logs.get("learning_rate")}
                curve.append(record)
                log(record)

    trainer, trajectories = build_trainer(spec, partial, [Progress()])
    resume = any(partial.glob("checkpoint-*"))
    started = time.monotonic()
    result = trainer.train(resume_from_checkpoint=resume or None)
    seconds = time.monotonic() - started
    final = partial / "final"
    trainer.save_model(str(final))  # on every rank: DeepSpeed ZeRO-3 gathers the weights from all of them
    tokens = trainer.state.num_input_tokens_seen  # already summed over the ranks
    metrics = {
        "examples": len(trainer.train_dataset), "trajectories": trajectories, "steps": result.global_step,
        "train_loss": result.training_loss, "final_loss": curve[-1]["loss"] if curve else math.nan,
        "seconds": round(seconds, 1), "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
        "resumed": resume, "loss_curve": curve, "lora": spec.lora, "bf16": trainer.args.bf16,
        "processes": trainer.accelerator.num_processes,
    }
    # Under a multi-process launcher the main process alone completes the folder, once the weights are written.
    trainer.accelerator.wait_for_everyone()
    if not trainer.accelerator.is_main_process:
        return metrics
    trainer.processing_class.save_pretrained(str(final))
    (final / "train_metrics.json").write_text(json.dumps(metrics, indent=1))
    if output.exists():
        shutil.rmtree(output)
    final.rename(output)
    shutil.rmtree(partial, ignore_errors=True)
    return metrics
