"""Generation throughput of the backends on the default model (SmolLM2-135M-Instruct).

Each run sends `batch` distinct prompts of ~300 tokens (ALFWorld-like rooms) in one `generate` call and asks for
64 new tokens each, greedy (temperature 0) and sampling (temperature 1, top_p 0.95). Throughput counts the
completion tokens returned (sampling may end early on EOS) over wall time, prefill included. Each backend runs in
each of --dtypes, side by side; the machine's own choice (sand.machine) is marked, and the first line names the
machine (CPU, vector units, whether bf16 is native). The table is kept in docs/results/generation_<isa>.md.

    python benchmarks/generation.py [--backends transformers,vllm,openai] [--dtypes float32,bfloat16]

(from the repository root, with the project installed: scripts/setup.sh, or PYTHONPATH=.)
"""
from __future__ import annotations

import argparse
import os
import random
import time

import torch
from results_page import Report

from sand.machine import machine_dtype, machine_line
from sand.models import SamplingParams, make_backend, resolve_model

RECEPTACLES = ["cabinet", "drawer", "countertop", "shelf", "fridge", "microwave", "sinkbasin", "stoveburner",
               "garbagecan", "coffeemachine", "toaster", "diningtable", "sidetable", "desk", "dresser", "safe"]
OBJECTS = ["mug", "apple", "knife", "plate", "bowl", "pan", "egg", "spoon", "book", "pencil", "keychain", "vase"]


def prompts(backend, count: int, tokens: int = 300) -> list[str]:
    """`count` distinct chat prompts of about `tokens` tokens each (seeded)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    rng = random.Random(0)
    result = []
    for _ in range(count):
        seen = []
        while True:
            seen.append(f"a {rng.choice(RECEPTACLES)} {rng.randint(1, 9)}")
            task = rng.choice(OBJECTS)
            text = (f"You are in the middle of a room. Looking quickly around you, you see {', '.join(seen)}.\n"
                    f"Your task is to: put a clean {task} in a {rng.choice(RECEPTACLES)}.")
            prompt = backend.render([{"role": "system", "content": "Interact with a household to solve a task. "
                                      "Reply with Think: ... or Action: ..."}, {"role": "user", "content": text}])
            if len(tokenizer(prompt).input_ids) >= tokens:
                result.append(prompt)
                break
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="transformers,vllm")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server for the openai backend")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="each backend runs in each (openai: ignored)")
    parser.add_argument("--new-tokens", type=int, default=64)
    # One thread by default: on shared cores a multi-threaded torch step stalls whenever another process runs.
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the transformers backend")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = resolve_model("smollm2-135m")
    batches = [int(b) for b in args.batches.split(",")]
    options = {"transformers": {"model_path": model, "batch_size": max(batches)},
               "vllm": {"model_path": model, "max_model_len": 2048},
               "openai": {"base_urls": [args.url], "model": str(model), "tokenizer": model}}
    report = Report("generation", "Generation throughput, SmolLM2-135M")
    report.print(machine_line())
    report.print(f"model {model.name}, {args.threads} torch threads, load average {os.getloadavg()[0]:.1f}; "
          f"* = this machine's default dtype ({machine_dtype()})")
    report.print(f"{'backend':<13}{'dtype':<11}{'mode':<10}{'batch':>6}{'prompt tok':>11}{'new tok':>9}{'seconds':>9}"
          f"{'tok/s':>8}")
    for kind in args.backends.split(","):
        for dtype in args.dtypes.split(",") if kind != "openai" else ["server"]:
            extra = {"dtype": dtype} if kind != "openai" else {}
            mark = "*" if dtype == machine_dtype() else ""
            with make_backend(kind, **options[kind], **extra) as backend:
                texts = prompts(backend, max(batches))
                backend.generate(texts[:2], SamplingParams(max_new_tokens=4))  # warm-up: first-call overheads
                for mode, temperature in (("greedy", 0.0), ("sampling", 1.0)):
                    params = SamplingParams(temperature=temperature, top_p=0.95 if temperature else 1.0,
                                            max_new_tokens=args.new_tokens, seed=0)
                    for batch in batches:
                        started = time.perf_counter()
                        results = backend.generate(texts[:batch], params)
                        seconds = time.perf_counter() - started
                        new = sum(c.completion_tokens for r in results for c in r)
                        prompt_tokens = sum(r[0].prompt_tokens for r in results) // batch
                        report.print(f"{kind:<13}{dtype + mark:<11}{mode:<10}{batch:>6}{prompt_tokens:>11}{new:>9}"
                                     f"{seconds:>9.2f}{new / seconds:>8.1f}")
    report.write()


if __name__ == "__main__":
    main()
