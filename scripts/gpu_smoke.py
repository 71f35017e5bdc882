"""The GPU node's smoke test, run by scripts/gpu-smoke.sh once the GPU extra is installed: on CUDA, a LoRA SFT step
of the tiny model, the tiny model and that adapter through the vLLM backend, and the checkpoint asset training
through `accelerate launch` (two processes where there are two GPUs). Each step prints what ran where; the first
failure stops it with its traceback."""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def step(name: str, run) -> object:
    started = time.monotonic()
    result, where = run()
    print(f"gpu-smoke: {name}: {where} ({time.monotonic() - started:.0f} s)", flush=True)
    return result


def lora_step(data: Path, home: Path):
    from sand.models.registry import tiny_model
    from sand.training.sft import TrainSpec, train

    out = home / "lora"
    metrics = train(TrainSpec(base_model=str(tiny_model()), data=[str(data)], output_dir=str(out), max_steps=2,
                              per_device_batch_size=1, gradient_accumulation_steps=1, max_length=512))
    assert metrics["steps"] == 2 and (out / "adapter_model.safetensors").is_file(), metrics
    return out, (f"{metrics['steps']} steps on {torch.cuda.get_device_name()}, bf16 {metrics['bf16']}, "
                 f"loss {metrics['final_loss']:.3f}")


def vllm_generation(adapter: Path):
    import vllm
    from vllm.platforms import current_platform

    from sand.models.backends import SamplingParams, make_backend
    from sand.models.registry import tiny_model

    if not current_platform.is_cuda():
        raise RuntimeError(f"vLLM {vllm.__version__} runs on {current_platform.device_name}, not CUDA")
    # A small share of the GPU: the launcher step's processes need the rest.
    backend = make_backend("vllm", model_path=tiny_model(), max_model_len=1024, gpu_memory_utilization=0.3)
    try:
        prompt = backend.render([{"role": "user", "content": "Your task is to find a plant."}])
        params = SamplingParams(temperature=0.0, max_new_tokens=16)
        [[base]] = backend.generate([prompt], params)
        [[tuned]] = backend.generate([prompt], params, adapter=str(adapter))
    finally:
        backend.close()
    assert base.completion_tokens and tuned.completion_tokens, (base, tuned)
    return None, (f"vLLM {vllm.__version__} on {current_platform.get_device_name()}: base weights and the LoRA "
                  f"adapter, {base.completion_tokens} and {tuned.completion_tokens} tokens")


def launcher_step(data: Path, home: Path):
    import polars as pl
    from dagster import PipesSubprocessClient, instance_for_test, materialize

    from resources import StoreResource
    from sand.experiment import EvalConfig, Experiment, TrainConfig
    from sand.models.registry import tiny_model
    from sand.store import Lineage, Store
    from sand_assets.models import build_model_assets

    processes = min(2, torch.cuda.device_count())  # DDP takes a GPU per process
    launcher = ["accelerate", "launch", "--num_processes", str(processes), "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    exp = Experiment(name="gpu_smoke", base_model=str(tiny_model()), train_data={"alfworld": None},
                     evaluation=EvalConfig(envs={}),
                     train=TrainConfig(max_steps=2, per_device_batch_size=1, gradient_accumulation_steps=1,
                                       max_length=512, launcher=launcher + ["--multi_gpu"] * (processes > 1)))
    # D_0 written directly: the checkpoint asset alone runs, through Dagster Pipes as in any run.
    Store(home).write("trajectories", "gpu_smoke/d0", pl.read_parquet(data), Lineage(asset="gpu-smoke"))
    checkpoint = build_model_assets(exp)[2]
    with instance_for_test() as instance:
        result = materialize([checkpoint], instance=instance, resources={
            "store": StoreResource(home=str(home)), "pipes": PipesSubprocessClient()})
    assert result.success  # the asset fails unless the child reported its metrics once
    [folder] = list((home / "checkpoints").iterdir())
    metrics = json.loads((folder / "train_metrics.json").read_text())
    assert metrics["processes"] == processes, metrics
    return None, (f"{' '.join(exp.train.launcher)}: {metrics['processes']} process(es) on "
                  f"{torch.cuda.device_count()} GPU(s), {metrics['steps']} steps, one checkpoint, metrics once")


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit(f"gpu-smoke: torch {torch.__version__} sees no CUDA device (built for CUDA {torch.version.cuda})")
    home = Path(tempfile.mkdtemp(prefix="sand-gpu-smoke-"))
    os.environ["SAND_HOME"] = str(home)
    print(f"gpu-smoke: torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.device_count()} GPU(s), "
          f"SAND_HOME {home}", flush=True)
    from sand.formats.eto import load_eto
    from sand.trajectory import to_frame

    data = home / "d0.parquet"
    to_frame(load_eto(REPO / "tests" / "data" / "eto_alfworld_sample.json", "alfworld")).write_parquet(data)
    adapter = step("LoRA SFT step", lambda: lora_step(data, home))
    step("vLLM backend", lambda: vllm_generation(adapter))
    step("launcher step", lambda: launcher_step(data, home))
    print("gpu-smoke: all steps passed", flush=True)


if __name__ == "__main__":
    main()
