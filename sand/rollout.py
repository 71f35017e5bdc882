"""The rollout engine: many episodes advance together, one batched model call per tick.

Evaluation, candidate sampling and critique rollouts are all episodes: a task, optionally an expert
prefix to replay and a first action to force, then the agent acts until the episode ends. At each
tick the engine renders the prompts of every live episode, makes ONE generation call for all of
them, parses the replies, steps every environment in parallel on threads, retires finished
episodes and admits waiting ones into the freed environments (continuous batching at the
episode level). Environments are pooled: a pool of N holds at most N engines (JVMs) alive.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from sand.envs.base import Environment, TaskSpec
from sand.models.backends import Backend, SamplingParams
from sand.react import conversation, parse_reply
from sand.trajectory import Step, Trajectory

FORMAT_ERROR = "Invalid format: reply with 'Thought: ...' and then 'Action: <one action>'."


@dataclass(frozen=True)
class EpisodeRequest:
    task: TaskSpec
    key: str = ""  # caller's identifier (cache / resume key)
    prefix: tuple[Step, ...] = ()  # expert steps replayed before the agent takes over
    first_action: str | None = None  # a candidate action executed right after the prefix
    max_steps: int | None = None  # None: the task's own limit


@dataclass
class EpisodeResult:
    request: EpisodeRequest
    instruction: str
    steps: list[Step] = field(default_factory=list)  # prefix + forced action + the agent's steps
    reward: float = 0.0
    done: bool = False
    format_errors: int = 0
    invalid_actions: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def agent_steps(self) -> list[Step]:
        return self.steps[len(self.request.prefix) + (self.request.first_action is not None):]

    def trajectory(self, source: str) -> Trajectory:
        t = self.request.task
        return Trajectory(id=f"{t.env}/{source}/{t.task_id}{'#' + self.request.key if self.request.key else ''}",
                          env=t.env, task=t.task, task_id=t.task_id, split=t.split, source=source,
                          instruction=self.instruction, steps=self.steps, reward=self.reward)


@dataclass
class _Live:
    result: EpisodeResult
    env: Environment
    limit: int


class RolloutEngine:
    """Runs episodes with `backend` on a pool of environments made by `make_env`."""

    def __init__(self, backend: Backend, make_env: Callable[[], Environment], pool_size: int = 8,
                 params: SamplingParams = SamplingParams(), history_steps: int | None = None):
        self.backend, self.make_env, self.pool_size = backend, make_env, pool_size
        self.params = SamplingParams(**{**vars(params), "n": 1})
        self.history_steps = history_steps  # keep only the last K steps in prompts (None: all)
        self._envs: list[Environment] = []
        self._threads = ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="env")

    def run(self, requests: Iterable[EpisodeRequest], adapter: str | None = None) -> Iterator[EpisodeResult]:
        """Yield each episode's result as soon as it ends (not in request order)."""
        waiting = iter(requests)
        live: list[_Live] = []
        free = list(self._envs)
        exhausted = False
        while True:
            admitted = []
            while not exhausted and len(live) + len(admitted) < self.pool_size:
                request = next(waiting, None)
                if request is None:
                    exhausted = True
                    break
                if not free:
                    self._envs.append(self.make_env())
                    free.append(self._envs[-1])
                admitted.append((request, free.pop()))
            for episode in self._threads.map(lambda a: self._start(*a), admitted):
                if episode.result.done:
                    free.append(episode.env)
                    yield episode.result
                else:
                    live.append(episode)
            if not live:
                if exhausted:
                    return
                continue
            self._tick(live, adapter)
            for episode in [e for e in live if e.result.done]:
                live.remove(episode)
                free.append(episode.env)
                yield episode.result

    def _start(self, request: EpisodeRequest, env: Environment) -> _Live:
        instruction = env.reset(request.task)
        result = EpisodeResult(request, instruction)
        limit = request.max_steps or env.max_steps
        forced = [s.action for s in request.prefix] + ([request.first_action] if request.first_action else [])
        for i, action in enumerate(forced):
            step = env.step(action)
            thought = request.prefix[i].thought if i < len(request.prefix) else ""
            result.steps.append(Step(thought, action, step.observation))
            result.reward, result.done = env.score, step.done
            if step.done:
                break
        result.done = result.done or len(result.steps) >= limit
        return _Live(result, env, limit)

    def _prompt(self, result: EpisodeResult) -> str:
        steps = result.steps[-self.history_steps:] if self.history_steps else result.steps
        return self.backend.render(conversation(result.request.task.env, result.instruction, steps))

    def _tick(self, live: list[_Live], adapter: str | None) -> None:
        completions = self.backend.generate([self._prompt(e.result) for e in live], self.params, adapter)
        replies = []
        for episode, [completion] in zip(live, completions):
            episode.result.prompt_tokens += completion.prompt_tokens
            episode.result.completion_tokens += completion.completion_tokens
            replies.append(parse_reply(completion.text))
        list(self._threads.map(self._act, live, replies))

    @staticmethod
    def _act(episode: _Live, reply) -> None:
        result = episode.result
        if reply.action is None:  # a malformed reply costs a step, as in the paper's harness
            result.format_errors += 1
            result.steps.append(Step(reply.thought, "", FORMAT_ERROR))
        else:
            step = episode.env.step(reply.action)
            result.invalid_actions += not step.valid
            result.steps.append(Step(reply.thought, reply.action, step.observation))
            result.reward, result.done = episode.env.score, step.done
        result.done = result.done or len(result.steps) >= episode.limit

    def close(self) -> None:
        for env in self._envs:
            env.close()
        self._envs.clear()
        self._threads.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
