"""Training throughput of SFT (TRL's SFTTrainer, as the `sft_checkpoint` asset runs it) on the default model.

Data: ScienceWorld gold trajectories of the train split (recorded here, a few seconds), cut into windows of
--history steps exactly as training does. Each configuration (dtype x LoRA/full x threads) trains --steps
optimizer steps in a fresh child process; the table shows trained tokens/s (non-padding tokens of the
batches, prompt turns included: they cost forward and backward passes too), seconds per step and the
child's peak resident memory. The first step (graph warm-up) is included, as a real run includes it.

    python benchmarks/training.py [--configs fp32-lora,bf16-lora,fp32-full] [--threads 1,2] [--steps 6]

Cores are shared: the load average is printed with the results, and the first line names the machine (CPU, vector
units, whether bf16 is native); * marks the precision training takes here by default (sand.machine). The table is
kept in docs/results/training_<isa>.md.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import tempfile
from pathlib import Path

from results_page import Report

from sand.machine import machine_line, native_bf16

CONFIGS = {"fp32-lora": (False, True), "bf16-lora": (True, True), "fp32-full": (False, False),
           "bf16-full": (True, False)}


def record_data(folder: Path, trajectories: int) -> Path:
    from sand.envs.sciworld import ScienceWorldEnv
    from sand.experts import record_experts
    from sand.selection import spread_tasks
    from sand.trajectory import to_frame

    with ScienceWorldEnv(variations_per_task=1) as env:
        recorded = record_experts(env, spread_tasks(env.tasks("train"), trajectories), "gold")
    path = folder / "gold.parquet"
    to_frame(recorded).write_parquet(path)
    return path


def train_once(data: Path, output: Path, bf16: bool, lora: bool, threads: int, steps: int, args) -> dict:
    """In a child process: one short training run; its metrics and peak RSS."""
    import torch

    from sand.models.registry import resolve_model
    from sand.training.sft import TrainSpec, train

    torch.set_num_threads(threads)
    spec = TrainSpec(base_model=str(resolve_model("smollm2-135m")), data=[str(data)], output_dir=str(output),
                     lora=lora, bf16=bf16, max_steps=steps, per_device_batch_size=args.batch,
                     gradient_accumulation_steps=args.accumulation, max_length=args.max_length,
                     history_steps=args.history, learning_rate=5e-4 if lora else 1e-5, save_steps=10_000)
    metrics = train(spec)
    metrics["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="fp32-lora,bf16-lora", help=f"of {', '.join(CONFIGS)}")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per configuration")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--history", type=int, default=6)
    parser.add_argument("--trajectories", type=int, default=8, help="ScienceWorld gold trajectories")
    args = parser.parse_args()
    spawn = multiprocessing.get_context("spawn")  # a fresh process per run: clean threads, honest peak memory
    with tempfile.TemporaryDirectory() as tmp:
        data = record_data(Path(tmp), args.trajectories)
        report = Report("training", "SFT training throughput, SmolLM2-135M")
        report.print(machine_line())
        report.print(f"SmolLM2-135M, batch {args.batch} x {args.accumulation}, max_length {args.max_length}, "
                     f"{args.steps} steps, load average {os.getloadavg()[0]:.1f}")
        report.print(f"{'config':<11}{'threads':>8}{'examples':>9}{'tokens/s':>10}{'s/step':>8}{'peak GB':>9}"
                     f"{'loss':>14}")
        for name in args.configs.split(","):
            bf16, lora = CONFIGS[name]
            for threads in (int(t) for t in args.threads.split(",")):
                output = Path(tmp) / f"{name}-{threads}"
                with spawn.Pool(1) as pool:
                    m = pool.apply(train_once, (data, output, bf16, lora, threads, args.steps, args))
                curve = m["loss_curve"]
                mark = "*" if bf16 == native_bf16() else ""
                report.print(f"{name + mark:<11}{threads:>8}{m['examples']:>9}{m['tokens_per_second']:>10.1f}"
                             f"{m['seconds'] / m['steps']:>8.1f}{m['peak_rss_gb']:>9.2f}"
                             f"{curve[0]['loss']:>7.2f}->{curve[-1]['loss']:.2f}")
        report.write()


if __name__ == "__main__":
    main()
