"""Rollout throughput: the batched rollout engine against the one-episode-at-a-time loop of public pipelines.

Workload: greedy episodes of the default model (SmolLM2-135M-Instruct, or with --adapter a LoRA checkpoint of it, such
as an experiment's SFT agent) on ScienceWorld dev variations (task types interleaved), capped at --steps agent steps,
history window --history. For each backend:
  (a) sequential: one episode at a time, one model call per turn, one environment;
  (b) the engine: every live episode's prompt in one stream of requests (vLLM batches them continuously and
      answers each as its sequence ends; other backends: one batched call a round), environments stepped on
      threads, a pool of at most --pool environments (JVMs), continuous admission.
(a) and (b) run the same first --sequential tasks; the speedup is their wall-time ratio and the greedy agreement
compares their replies step by step. (b) runs 1, 8, 32, ... episodes (cost growth). Raw throughput of a run: all
the run's prompts replayed from an empty prefix cache, turn by turn, pool-size episodes in one generate call a turn
(raw_throughput): the same prefill and decoding, without environments or waiting for replies. (a) is set against
the raw throughput of (b) on the same tasks. The transformers backend re-reads every prompt in full at every turn (no
cache across calls), so it gets at most --transformers-cap episodes. vLLM's prefix cache is emptied before each timed
run.

    python benchmarks/rollout.py [--backends transformers,vllm] [--episodes 1,8,32,128] [--steps 15] [--adapter DIR]

The prompted base model answers most turns with a malformed reply (a few tokens, no environment step): a
prefill-bound workload. A trained agent writes a thought and acts, as the agents of SAND's rollouts do.

Cores are shared: the load average is printed with the results.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import deque
from dataclasses import dataclass

import torch

from sand.envs.sciworld import ScienceWorldEnv
from sand.machine import machine_dtype, machine_line
from sand.models import SamplingParams, make_backend, resolve_model
from sand.models.registry import merged_model
from sand.react import parse_reply
from sand.rollout import FORMAT_ERROR, EpisodeRequest, RolloutEngine, Tick, agent_prompt
from sand.selection import spread_tasks
from sand.trajectory import Step

JVM_HEAP_MB = 200  # ~260 MB resident per ScienceWorld JVM instead of ~350


@dataclass
class Run:
    label: str
    episodes: int
    pool: int
    seconds: float
    steps: int
    env_steps: int  # steps whose action reached the environment (the others were format errors)
    tokens: int  # generated
    calls: int
    generate_seconds: float  # inside the backend's generate calls
    replies: dict[str, list[str]]  # task id -> the agent's replies
    prompts: list[list[str]]  # each episode's prompts, turn by turn, episodes in admission order
    raw: float = float("nan")  # the backend's batched tokens/s on this run's prompts (replayed)

    def row(self) -> str:
        tok_s = self.tokens / self.seconds
        return (f"{self.label:<16}{self.episodes:>5}{self.pool:>5}{self.seconds:>8.1f}"
                f"{self.seconds / self.episodes:>7.2f}{self.episodes / self.seconds:>7.3f}"
                f"{self.steps / self.seconds:>7.2f}{self.env_steps / self.seconds:>7.2f}"
                f"{self.generate_seconds / self.seconds:>6.0%}{tok_s:>7.1f}{self.raw:>7.1f}{tok_s / self.raw:>6.0%}"
                f"{self.calls:>7}{self.steps / self.calls:>7.1f}")


HEADER = (f"{'run':<16}{'eps':>5}{'pool':>5}{'wall s':>8}{'s/ep':>7}{'ep/s':>7}{'step/s':>7}{'env/s':>7}{'gen%':>6}"
          f"{'tok/s':>7}{'raw':>7}{'%raw':>6}{'rounds':>7}{'/round':>7}")
LEGEND = ("step/s: agent turns per second; env/s: turns whose action reached the environment; gen%: share of wall "
          "time inside the backend's generate calls; tok/s: generated "
          "tokens per wall second; raw: the backend's tokens/s on the run's prompts replayed turn by turn, "
          "pool-size episodes a generate call; rounds: (a) model calls, (b) engine rounds (vLLM answers each reply as "
          "its sequence ends, the others keep decoding; other backends: one batched call a round); /round: "
          "replies per round")


def sequential(backend, env, tasks, params: SamplingParams, max_steps: int, history: int | None) -> Run:
    """The loop public pipelines run: reset, then one model call and one env step per turn."""
    replies, prompts, steps_total, env_steps, tokens, generating = {}, [], 0, 0, 0, 0.0
    start = time.perf_counter()
    for task in tasks:
        instruction, steps, texts = env.reset(task), [], []
        prompts.append([])
        limit = min(max_steps, env.max_steps)
        while len(steps) < limit:
            prompt = agent_prompt(backend, task.env, instruction, steps, history, params.max_new_tokens)
            prompts[-1].append(prompt)
            called = time.perf_counter()
            [[completion]] = backend.generate([prompt], params)
            generating += time.perf_counter() - called
            texts.append(completion.text)
            tokens += completion.completion_tokens
            reply = parse_reply(completion.text)
            if reply.action is None:
                steps.append(Step(reply.thought, "", FORMAT_ERROR))
                continue
            result = env.step(reply.action)
            env_steps += 1
            steps.append(Step(reply.thought, reply.action, result.observation))
            if result.done:
                break
        replies[task.task_id] = texts
        steps_total += len(steps)
    return Run("(a) sequential", len(tasks), 1, time.perf_counter() - start, steps_total, env_steps, tokens,
               steps_total, generating, replies, prompts)


def engine_run(engine: RolloutEngine, ticks: list[Tick], tasks, max_steps: int) -> Run:
    ticks.clear()
    start = time.perf_counter()
    results = list(engine.run([EpisodeRequest(t, max_steps=max_steps) for t in tasks]))
    seconds = time.perf_counter() - start
    steps = sum(len(r.steps) for r in results)
    prompts: dict[str, list[str]] = {t.task_id: [] for t in tasks}  # admission order, each episode's turns
    for tick in ticks:
        for request, prompt in zip(tick.requests, tick.prompts):
            prompts[request.task.task_id].append(prompt)
    return Run("(b) engine", len(tasks), min(engine.pool_size, len(tasks)), seconds, steps,
               steps - sum(r.format_errors for r in results), sum(r.completion_tokens for r in results), len(ticks),
               sum(t.generate_seconds for t in ticks), {r.request.task.task_id: r.replies for r in results},
               list(prompts.values()))


def raw_throughput(backend, episodes: list[list[str]], params: SamplingParams, batch: int) -> float:
    """The backend's batched tokens/s on a run's own prompts: `episodes` (each episode's prompts, turn by turn)
    replayed from an empty prefix cache, `batch` episodes at a time in one generate call a turn, a finished
    episode's place taken by the next. Each call prefills what the run had to (the newest turn; with vLLM the
    rest of a prompt is the previous call's cached prefix, as in the run) and decodes, with no environment
    stepped and no reply waited for: the model's limit on this workload."""
    forget_prefixes(backend)
    waiting = deque(deque(e) for e in episodes if e)
    live: list[deque[str]] = []
    tokens, seconds = 0, 0.0
    while waiting or live:
        while len(live) < batch and waiting:
            live.append(waiting.popleft())
        prompts = [episode.popleft() for episode in live]
        live = [episode for episode in live if episode]
        began = time.perf_counter()
        tokens += sum(c.completion_tokens for [c] in backend.generate(prompts, params))
        seconds += time.perf_counter() - began
    return tokens / seconds


def agreement(a: dict[str, list[str]], b: dict[str, list[str]]) -> tuple[float, float]:
    """(share of (a)'s steps whose reply (b) reproduced before the episodes first diverged, share of episodes
    identical). After a divergence the histories differ, so later steps are not compared."""
    same_steps = total = same_episodes = 0
    for task_id, replies in a.items():
        other = b[task_id]
        prefix = next((i for i, (x, y) in enumerate(zip(replies, other)) if x != y), min(len(replies), len(other)))
        same_steps += prefix
        total += len(replies)
        same_episodes += replies == other
    return same_steps / max(total, 1), same_episodes / max(len(a), 1)


def forget_prefixes(backend) -> None:
    """Empty vLLM's prefix cache, so no run is served prompts an earlier run of the same tasks left there."""
    if hasattr(backend, "_llm"):
        backend._llm.reset_prefix_cache()


def bench_backend(kind: str, model, tasks, args) -> None:
    params = SamplingParams(max_new_tokens=args.new_tokens)
    options = {"transformers": {"model_path": model, "batch_size": args.pool, "dtype": args.dtype},
               "vllm": {"model_path": model, "max_model_len": 4096, "enable_lora": False, "dtype": args.dtype,
                        **({"block_size": args.block_size} if args.block_size else {})}}[kind]
    cap = args.transformers_cap if kind == "transformers" else None
    first = tasks[:min(args.sequential, cap or args.sequential)]
    counts = sorted({n for n in args.episodes if cap is None or n <= cap} | {len(first)})
    pool = min(args.pool, counts[-1])

    def make_env():
        return ScienceWorldEnv(jvm_heap_mb=JVM_HEAP_MB)

    started = time.perf_counter()
    with make_backend(kind, **options) as backend:
        print(f"\n== {kind}: started in {time.perf_counter() - started:.0f} s; load average "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        ticks: list[Tick] = []
        with make_env() as env, RolloutEngine(backend, make_env, pool, params, args.history,
                                              on_tick=ticks.append) as engine:
            # Warm-up outside the timings: every JVM, the engine's and (a)'s, runs one full episode (a fresh JVM
            # steps slowly until its JIT has compiled the step path), and the model's first-call costs are paid.
            list(engine.run([EpisodeRequest(t, max_steps=args.steps) for t in tasks[:pool]]))
            sequential(backend, env, tasks[:1], params, args.steps, args.history)
            print(HEADER)
            forget_prefixes(backend)
            a = sequential(backend, env, first, params, args.steps, args.history)
            runs = []
            for n in counts:
                forget_prefixes(backend)
                run = engine_run(engine, ticks, tasks[:n], args.steps)
                run.raw = raw_throughput(backend, run.prompts, params, run.pool)
                if n == len(first):
                    a.raw = run.raw  # the same tasks, batched as the engine batched them
                    print(a.row(), flush=True)
                    b = run
                print(run.row(), flush=True)
                runs.append(run)
        step_agreement, episode_agreement = agreement(a.replies, b.replies)
        print(f"\n{kind} (load average now {os.getloadavg()[0]:.1f}): speedup (a)/(b) on {len(first)} episodes "
              f"{a.seconds / b.seconds:.2f}x ({a.seconds:.1f} s vs {b.seconds:.1f} s); greedy agreement (a) vs (b): "
              f"{step_agreement:.1%} of steps before the first divergence, {episode_agreement:.0%} of episodes "
              f"identical")
        unit = runs[0].seconds / runs[0].episodes
        print("cost per episode relative to " + f"{runs[0].episodes} episode(s): " +
              ", ".join(f"{r.episodes}: {r.seconds / r.episodes / unit:.2f}x" for r in runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="transformers,vllm")
    parser.add_argument("--episodes", default="1,8,32,128", help="engine runs of this many episodes")
    parser.add_argument("--sequential", type=int, default=32, help="episodes of the (a) vs (b) comparison")
    parser.add_argument("--transformers-cap", type=int, default=4, help="most episodes per transformers run")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--history", type=int, default=8, help="steps kept in prompts (0: all)")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--pool", type=int, default=16, help="most environments (JVMs) alive")
    parser.add_argument("--block-size", type=int, help="vLLM KV cache block size (the prefix cache's unit; "
                        "CPU default 128)")
    parser.add_argument("--dtype", default=machine_dtype(), help="both backends' dtype (default: this machine's)")
    parser.add_argument("--adapter", help="LoRA checkpoint folder of the default model to run as the agent "
                        "(merged into the weights once); default: the prompted base model")
    parser.add_argument("--home", help="SAND_HOME (converted model cache); default: $SAND_HOME or a temp dir")
    args = parser.parse_args()
    args.episodes = [int(n) for n in args.episodes.split(",")]
    args.history = args.history or None
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GB of KV cache (and prefix cache) for vLLM on CPU
    os.environ["SAND_HOME"] = args.home or os.environ.get("SAND_HOME") or tempfile.mkdtemp(prefix="sand-bench-")
    torch.set_num_threads(1)  # shared cores: a multi-threaded torch step stalls whenever another process runs
    model = merged_model("smollm2-135m", args.adapter, args.dtype) if args.adapter else resolve_model("smollm2-135m")
    with ScienceWorldEnv(jvm_heap_mb=JVM_HEAP_MB) as lister:
        tasks = spread_tasks(lister.tasks("dev"), max(args.episodes + [args.sequential]))
    agent = f"{model.name} (adapter {args.adapter})" if args.adapter else model.name
    print(machine_line())
    print(f"model {agent}, {args.dtype}; {len(tasks)} ScienceWorld dev variations over "
          f"{len({t.task for t in tasks})} task types; {args.steps} steps, history {args.history}, "
          f"{args.new_tokens} new tokens, greedy; pool {args.pool}")
    print(LEGEND)
    for kind in args.backends.split(","):
        bench_backend(kind, model, tasks, args)


if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which re-imports this module
    main()
