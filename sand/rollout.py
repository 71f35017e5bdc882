"""The rollout engine: many episodes advance together on one stream of model requests.

Evaluation, candidate sampling and critique rollouts are all episodes: a task, optionally an expert
prefix to replay and a first action to force, then the agent acts until the episode ends. Every live
episode has one prompt in the backend's stream (`Backend.stream`). Each round takes the replies that
are ready, parses them, steps those environments in parallel on threads and submits their next
prompts. With vLLM a reply is ready as soon as its own sequence ends while the others keep decoding
(continuous batching at the token level); other backends answer all pending prompts in one batched
call per round. Finished episodes free their environment for a waiting one; the new episode's reset
and replay run while the next round generates, and it joins the round after. Environments are
pooled: a pool of N holds at most N engines (JVMs) alive, reused across episodes and runs. The engine
never asks an environment for its admissible actions (ScienceWorld computes them at ~50 ms a call).

An environment whose engine dies or stops answering (`EnvironmentFault`: a killed or stalled JVM) is
thrown away and its episode started again from the beginning on a fresh one, up to `max_attempts`
times; then the run fails naming the task. An episode is yielded once, from its attempt that ended.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace

from sand.envs.base import Environment, EnvironmentFault, TaskSpec
from sand.errors import SandError
from sand.models.backends import Backend, Completion, SamplingParams
from sand.react import conversation, parse_reply
from sand.trajectory import Step, Trajectory

log = logging.getLogger(__name__)

FORMAT_ERROR = "Invalid format: reply with 'Thought: ...' and then 'Action: <one action>'."


@dataclass(frozen=True)
class EpisodeRequest:
    task: TaskSpec
    key: str = ""  # caller's identifier (cache / resume key)
    prefix: tuple[Step, ...] = ()  # expert steps replayed before the agent takes over
    first_action: str | None = None  # a candidate action executed right after the prefix
    max_steps: int | None = None  # cap on all steps, prefix and forced action included (None: the task's limit)
    max_agent_steps: int | None = None  # cap on the steps the agent takes after the forced ones
    first_thought: str = ""  # the candidate's thought, shown in the history with first_action
    # End the episode after this many consecutive agent actions the environment rejects (MPO's ScienceWorld
    # harness: 10; format errors neither count nor break the run). None: no such rule.
    max_invalid_streak: int | None = None


@dataclass
class EpisodeResult:
    request: EpisodeRequest
    instruction: str
    steps: list[Step] = field(default_factory=list)  # prefix + forced action + the agent's steps
    scores: list[float] = field(default_factory=list)  # the environment's score at the start, then after each step
    valid: list[bool] = field(default_factory=list)  # per step: the environment accepted its action
    replies: list[str] = field(default_factory=list)  # the agent's raw reply at each of its steps
    reward: float = 0.0  # the environment's normalised score at the end
    done: bool = False
    format_errors: int = 0  # agent replies without an action: each cost a step, the env did not move
    invalid_actions: int = 0  # agent actions the environment did not understand or could not apply
    invalid_streak: int = 0  # consecutive invalid agent actions up to now
    invalid_cutoff: bool = False  # the episode ended by request.max_invalid_streak
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


@dataclass(frozen=True)
class Tick:
    """What one round did (the replies one `Stream.finished` call returned), for `on_tick` observers."""

    requests: list[EpisodeRequest]  # the episodes answered, in the order of prompts and completions
    prompts: list[str]
    completions: list[Completion]
    generate_seconds: float
    env_seconds: float


def history_window(steps: list[Step], history_steps: int | None) -> list[Step]:
    """The steps an agent prompt shows: all of them up to `history_steps`, then a window of at most
    `history_steps` that moves in strides of half its length (never fewer than half plus one steps).

    A window sliding one step a turn would change the prompt's prefix at every turn; moving it in strides
    keeps consecutive prompts extensions of each other between moves, so a backend's prefix cache re-reads
    only the newest turn instead of the whole history (prefill is what a CPU spends its time on).
    """
    if not history_steps or len(steps) <= history_steps:
        return steps
    stride = max(1, history_steps // 2)
    return steps[((len(steps) - history_steps - 1) // stride + 1) * stride:]


def agent_prompt(backend: Backend, env: str, instruction: str, steps: list[Step], history_steps: int | None,
                 reply_tokens: int) -> str:
    """The agent's prompt for the turn after `steps`: what the engine asks, and what sampling conditions on.

    It shows `history_window`'s steps, less its oldest ones while the prompt and `reply_tokens` would not fit in
    the backend's context (a long episode then still gets its turns, where the engine would refuse the prompt).
    """
    shown = history_window(steps, history_steps)
    prompt = backend.render(conversation(env, instruction, shown))
    limit = backend.context_length
    while limit is not None and backend.count_tokens(prompt) + reply_tokens > limit:
        if not shown:
            raise SandError(f"the {env} agent prompt for '{instruction[:80]}' takes {backend.count_tokens(prompt)} "
                            f"tokens without any step of history, and a reply {reply_tokens} more: the backend's "
                            f"context is {limit} tokens (raise the backend's max_model_len or lower max_new_tokens)")
        shown = shown[1:]
        prompt = backend.render(conversation(env, instruction, shown))
    return prompt


@dataclass
class _Live:
    result: EpisodeResult
    env: Environment
    limit: int  # the episode ends once it has this many steps
    attempt: int = 1  # 1 + how often its environment failed and it was started again
    fault: EnvironmentFault | None = None  # the environment failed during the last step


class RolloutEngine:
    """Runs episodes with `backend` on a pool of at most `pool_size` environments made by `make_env`.

    `params.n` is ignored (one reply per episode and turn). `history_steps` bounds the steps a prompt
    shows (`history_window`; None: all). `max_attempts` bounds the starts of one episode when its
    environment fails (see the module doc). One `run` at a time per engine.
    """

    def __init__(self, backend: Backend, make_env: Callable[[], Environment], pool_size: int = 8,
                 params: SamplingParams = SamplingParams(), history_steps: int | None = None,
                 on_tick: Callable[[Tick], None] | None = None, max_attempts: int = 3):
        if pool_size < 1:
            raise SandError(f"pool_size must be at least 1, got {pool_size}")
        self.backend, self.make_env, self.pool_size = backend, make_env, pool_size
        self.params = replace(params, n=1)
        self.history_steps = history_steps
        self.on_tick = on_tick
        self.max_attempts = max_attempts
        self._envs: list[Environment] = []  # every environment made, closed by close()
        self._idle: list[Environment] = []  # those not running an episode
        self._threads = ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="env")
        self._running = False

    def run(self, requests: Iterable[EpisodeRequest], adapter: str | None = None) -> Iterator[EpisodeResult]:
        """Yield each episode's result as soon as it ends (not in request order). `requests` is read
        lazily, as environments free up.

        Each episode's next prompt goes to the backend's stream as soon as its environment has stepped, so
        with a continuously batching backend (vLLM) an episode never waits for the slowest reply of a round."""
        if self._running:
            raise SandError("this RolloutEngine is already running episodes: one run at a time")
        self._running = True
        waiting = iter(requests)
        live: dict[int, _Live] = {}
        prompts: dict[int, str] = {}  # what each live episode was last asked
        starting: list[Future[_Live]] = []  # admitted last round (resetting, replaying forced steps): join this one
        numbers = itertools.count()
        stream = self.backend.stream(self.params, adapter)

        def ask(n: int, episode: _Live) -> None:
            live[n] = episode
            prompts[n] = self._prompt(episode.result)
            stream.submit(n, prompts[n])

        try:
            while True:
                for future in starting:
                    episode = future.result()
                    if episode.result.done:  # the forced steps ended it
                        self._idle.append(episode.env)
                        yield episode.result
                    else:
                        ask(next(numbers), episode)
                starting = []
                while len(live) + len(starting) < self.pool_size and (request := next(waiting, None)) is not None:
                    env = self._idle.pop() if self._idle else None
                    starting.append(self._threads.submit(self._start_retrying, request, env))
                if not live:
                    if not starting:
                        return
                    continue
                start = time.perf_counter()
                answered = stream.finished()
                generated = time.perf_counter()
                episodes = [live[n] for n, _ in answered]
                completions = [c for _, c in answered]
                list(self._threads.map(self._act_guarded, episodes, completions))
                if self.on_tick is not None:
                    self.on_tick(Tick([e.result.request for e in episodes], [prompts[n] for n, _ in answered],
                                      completions, generated - start, time.perf_counter() - generated))
                for (n, _), episode in zip(answered, episodes):
                    if episode.fault is not None:  # start it again on a fresh environment
                        del live[n], prompts[n]
                        attempt = self._discard(episode.env, episode.result.request, episode.attempt, episode.fault)
                        starting.append(self._threads.submit(self._start_retrying, episode.result.request,
                                                             None, attempt))
                    elif episode.result.done:
                        del live[n], prompts[n]
                        self._idle.append(episode.env)
                        yield episode.result
                    else:
                        ask(n, episode)
        finally:  # also when the caller stops early: every environment is free again (reset on next use)
            stream.close()
            wait(starting)
            self._idle = list(self._envs)
            self._running = False

    def _start_retrying(self, request: EpisodeRequest, env: Environment | None, attempt: int = 1) -> _Live:
        while True:
            if env is None:
                env = self.make_env()
                self._envs.append(env)
            try:
                return replace(self._start(request, env), attempt=attempt)
            except EnvironmentFault as fault:
                attempt, env = self._discard(env, request, attempt, fault), None

    def _discard(self, env: Environment, request: EpisodeRequest, attempt: int, fault: EnvironmentFault) -> int:
        """Throw away a failed environment; return the episode's next attempt, or raise once none is left."""
        env.abort()
        self._envs.remove(env)
        task = request.task
        if attempt >= self.max_attempts:
            raise EnvironmentFault(f"{task.env} task {task.task_id!r}{' #' + request.key if request.key else ''}: "
                                   f"the environment failed on all {attempt} attempts; last: {fault}") from fault
        log.warning("%s task %r: %s; starting the episode again on a fresh environment (attempt %d of %d)",
                    task.env, task.task_id, fault, attempt + 1, self.max_attempts)
        return attempt + 1

    def _start(self, request: EpisodeRequest, env: Environment) -> _Live:
        result = EpisodeResult(request, env.reset(request.task), scores=[env.score])
        forced = [(s.thought, s.action) for s in request.prefix]
        if request.first_action is not None:
            forced.append((request.first_thought, request.first_action))
        limit = env.max_steps if request.max_steps is None else min(request.max_steps, env.max_steps)
        if request.max_agent_steps is not None:
            limit = min(limit, len(forced) + request.max_agent_steps)
        for thought, action in forced:
            step = env.step(action)
            result.steps.append(Step(thought, action, step.observation))
            result.scores.append(step.score)
            result.valid.append(step.valid)
            result.reward, result.done = step.score, step.done
            if step.done:
                break
        result.done = result.done or len(result.steps) >= limit
        return _Live(result, env, limit)

    def _prompt(self, result: EpisodeResult) -> str:
        return agent_prompt(self.backend, result.request.task.env, result.instruction, result.steps,
                            self.history_steps, self.params.max_new_tokens)

    @classmethod
    def _act_guarded(cls, episode: _Live, completion: Completion) -> None:
        try:
            cls._act(episode, completion)
        except EnvironmentFault as fault:
            episode.fault = fault

    @staticmethod
    def _act(episode: _Live, completion: Completion) -> None:
        result = episode.result
        result.prompt_tokens += completion.prompt_tokens
        result.completion_tokens += completion.completion_tokens
        result.replies.append(completion.text)
        reply = parse_reply(completion.text)
        if reply.action is None:  # a malformed reply costs a step, as in the paper's harness
            result.format_errors += 1
            result.steps.append(Step(reply.thought, "", FORMAT_ERROR))
            result.scores.append(result.scores[-1])
            result.valid.append(False)
        else:
            step = episode.env.step(reply.action)
            result.invalid_actions += not step.valid
            result.invalid_streak = 0 if step.valid else result.invalid_streak + 1
            result.steps.append(Step(reply.thought, reply.action, step.observation))
            result.scores.append(step.score)
            result.valid.append(step.valid)
            result.reward, result.done = step.score, step.done
        result.done = result.done or len(result.steps) >= episode.limit
        cap = result.request.max_invalid_streak
        if not result.done and cap is not None and result.invalid_streak >= cap:
            result.done = result.invalid_cutoff = True

    def close(self) -> None:
        self._threads.shutdown()
        for env in self._envs:
            env.close()
        self._envs.clear()
        self._idle.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
