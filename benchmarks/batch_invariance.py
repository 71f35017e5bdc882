"""Does a prompt's greedy reply depend on the prompts batched with it? Each backend decodes the same prompts
alone (one `generate` call each), together, and in reverse order beside other prompts, and prints how many
replies differ from the lone ones. Where they do, seeded runs whose batches form differently (a rollout engine's
batches follow how fast each environment answers) produce different agents and data.

    python benchmarks/batch_invariance.py [--backends transformers,vllm] [--prompts 16]
"""
from __future__ import annotations

import argparse

from generation import prompts

from sand.models import SamplingParams, make_backend, resolve_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="transformers,vllm")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=96)
    args = parser.parse_args()
    model = resolve_model("smollm2-135m")
    options = {"transformers": {"model_path": model, "batch_size": 2 * args.prompts},
               "vllm": {"model_path": model, "max_model_len": 2048}}
    params = SamplingParams(max_new_tokens=args.new_tokens)
    print(f"model {model.name}, {args.prompts} prompts, {args.new_tokens} new tokens, greedy")
    for kind in args.backends.split(","):
        with make_backend(kind, **options[kind]) as backend:
            texts = prompts(backend, 2 * args.prompts)
            mine, others = texts[:args.prompts], texts[args.prompts:]
            alone = [backend.generate([t], params)[0][0].text for t in mine]
            together = [r[0].text for r in backend.generate(mine, params)]
            mixed = [r[0].text for r in backend.generate(others[:args.prompts // 2] + mine[::-1], params)]
            mixed = mixed[args.prompts // 2:][::-1]
            print(f"{kind:<13} replies differing from alone: together {sum(a != b for a, b in zip(alone, together))}"
                  f", reversed beside {args.prompts // 2} others {sum(a != b for a, b in zip(alone, mixed))}"
                  f" (of {args.prompts})", flush=True)


if __name__ == "__main__":
    main()
