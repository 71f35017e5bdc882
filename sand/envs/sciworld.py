"""ScienceWorld (the `scienceworld` PyPI package's jar) behind `sand.envs.base.Environment`.

We drive the jar's `PythonInterface` server object over py4j ourselves instead of using
`scienceworld.ScienceWorldEnv`, whose `step` also rebuilds the valid-action list (and look,
inventory, task description) on every call. Measured on 2 cores, warm JVM, the gold paths of 8
tasks (209 steps): upstream `step` median 28 ms / mean 37 ms; our `step` (server `step` +
`getScore` + `getCompleted`) median 5.1 ms / mean 6.5 ms, of which the simulation tick is 4.5 ms,
with identical observations and scores. The valid-action list costs ~50 ms, so
`admissible_actions()` computes it only when asked. JVM start ~1 s; `reset` 20-45 ms; generating
a gold path 0.1-0.7 s (cached per task id).

Every call to the JVM has a deadline (`call_timeout_s`): a watchdog kills a JVM that does not answer in
time, which ends the call waiting on it. A JVM that died (killed, out of memory) or stopped answering
(stopped, hung) is killed and the call raises
`EnvironmentFault` naming the task, so the rollout engine starts the episode again on a fresh JVM.
"""
from __future__ import annotations

import functools
import json
import math
import subprocess
import threading
import weakref
from pathlib import Path

from py4j.java_collections import JavaArray, JavaList
from py4j.java_gateway import GatewayParameters, JavaGateway, launch_gateway
from py4j.protocol import Py4JError, Py4JJavaError
from scienceworld.constants import BASEPATH, JAR_PATH

from sand.envs.base import Environment, EnvironmentFault, StepResult, TaskSpec
from sand.errors import SandError

LIMITS_PATH = Path(__file__).with_name("sciworld_limits.json")

# The parser's answers to input it cannot map to an action: no template matched, or a reply to a
# disambiguation prompt ("Ambiguous request: ... enter the number") that is not one of the numbers.
# The prompt itself counts as understood: the agent answers it with a number.
_NOT_UNDERSTOOD = ("No known action matches that input.", "Unknown action.")

# A fresh JVM's first task load compiles and loads most of the simulator: seconds, many more on a busy
# machine. Until a load has succeeded, calls get this much time at least.
STARTUP_TIMEOUT_S = 120.0

# Variation splits per task name: fixed by the jar, the same for every JVM, so shared.
_SPLIT_CACHE: dict[str, dict[str, list[int]]] = {}


def _shutdown_jvm(gateway: JavaGateway, proc: subprocess.Popen) -> None:
    try:
        gateway.shutdown()
    except Py4JError:  # the JVM is gone already
        pass
    if proc.poll() is None:
        # die_on_exit makes the JVM exit when its stdin sees a line (or EOF).
        proc.stdin.write(b"\n")
        proc.stdin.flush()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@functools.cache
def _load_limits() -> dict[str, int]:
    if not LIMITS_PATH.exists():
        raise SandError(f"{LIMITS_PATH} is missing: regenerate it with sand.envs.sciworld.build_step_limits()")
    return json.loads(LIMITS_PATH.read_text())["limits"]


class _Guarded:
    """The JVM's server object: every call (and the list it returns, read in full) under the env's watch."""

    def __init__(self, server, env: ScienceWorldEnv):
        self._server, self._env = server, env

    def __getattr__(self, name: str):
        def call(*args):
            timeout = self._env.call_timeout_s
            if timeout and not self._env._warm:
                timeout = max(timeout, STARTUP_TIMEOUT_S)
            watchdog = threading.Timer(timeout, self._env._stalled) if timeout else None
            if watchdog:
                watchdog.start()
            try:
                result = getattr(self._server, name)(*args)
                return list(result) if isinstance(result, (JavaList, JavaArray)) else result
            except Py4JJavaError:  # the simulator's own exception: the JVM is fine
                raise
            except Py4JError as exc:
                raise self._env._fault(name, exc) from None
            finally:
                if watchdog:
                    watchdog.cancel()
        return call


class ScienceWorldEnv(Environment):
    """One JVM per object; one episode at a time. Task ids are "task_name:variation"."""

    name = "sciworld"
    SPLITS = ("train", "dev", "test")

    def __init__(self, simplifications: str = "easy", jvm_heap_mb: int | None = 300,
                 task_names: list[str] | None = None, variations_per_task: int | None = None,
                 call_timeout_s: float | None = 60.0):
        if variations_per_task is not None and variations_per_task < 1:
            raise SandError(f"variations_per_task must be at least 1, got {variations_per_task}")
        self.simplifications = simplifications
        self.variations_per_task = variations_per_task
        # The simulator iterates hash sets keyed by identity hash codes (what a room lists, the order
        # of random draws such as Mendelian crosses, the gold path), and by default those differ
        # between runs: the same actions gave different observations. A constant identity hash makes
        # that iteration follow insertion order, so replays and gold paths are reproducible (same
        # observations for 269 gold episodes in two JVMs), with no measurable slowdown.
        javaopts = ["-XX:+UnlockExperimentalVMOptions", "-XX:hashCode=2"]
        # py4j reads the JVM's port from its first stdout line, so nothing else may print there: JVM
        # warnings go to stderr, and no /tmp/hsperfdata file is kept (a stale one locked under a reused pid
        # printed "Cannot use file /tmp/hsperfdata_root/<pid>" where the port was expected).
        javaopts += ["-XX:-UsePerfData", "-Xlog:all=warning:stderr"]
        # -Xmx on the child's command line caps only this JVM (unbounded it grows to 0.5-0.7 GB),
        # without touching this process's environment. die_on_exit: the JVM dies with us.
        javaopts += [f"-Xmx{jvm_heap_mb}m"] if jvm_heap_mb else []
        try:
            port, proc = launch_gateway(classpath=JAR_PATH, javaopts=javaopts, die_on_exit=True, cwd=BASEPATH,
                                        return_proc=True)
        except FileNotFoundError as e:
            raise SandError("ScienceWorld needs Java 11+: no `java` on PATH") from e
        # No memory management: we hold one server object, and its finalizers would call a JVM we killed.
        gateway = JavaGateway(gateway_parameters=GatewayParameters(port=port, auto_field=True,
                                                                   enable_memory_management=False),
                              java_process=proc)
        self._proc, self.call_timeout_s, self._timed_out, self._warm = proc, call_timeout_s, False, False
        self._close_jvm = weakref.finalize(self, _shutdown_jvm, gateway, proc)
        self._task_id: str | None = None  # what the JVM was last asked to load, for error messages
        self._server = _Guarded(gateway.jvm.scienceworld.runtime.pythonapi.PythonInterface(), self)
        all_names = list(self._server.getTaskNames())
        # The server would silently ignore an unknown simplification.
        all_simplifications = ["easy", *self._server.getPossibleSimplifications().split(", ")]
        unknown = sorted(set(task_names or ()) - set(all_names))
        unknown += [s for s in simplifications.split(",") if s and s not in all_simplifications]
        if unknown:
            self.close()
            raise SandError(f"unknown ScienceWorld task names or simplifications {unknown}; task names: "
                            f"{', '.join(all_names)}; simplifications: {', '.join(all_simplifications)}")
        self.task_names = list(task_names) if task_names else all_names
        self._gold: dict[str, list[str]] = {}
        self._task: str | None = None  # task name of the running episode
        self._steps = 0
        self._score = 0.0

    def _load(self, task_id: str, gold_path: bool = False) -> str:
        """Load a variation into the JVM (this ends the running episode); return the task name."""
        name, _, variation = task_id.rpartition(":")
        if name not in self.task_names or not variation.isdigit():
            raise SandError(f"unknown ScienceWorld task id {task_id!r}: expected 'task_name:variation' "
                            f"with task_name one of {', '.join(self.task_names)}")
        self._task, self._task_id = None, task_id
        error = self._server.load(name, int(variation), self.simplifications, gold_path)
        self._warm = True
        if error:
            raise SandError(f"ScienceWorld cannot load {task_id!r} with simplifications "
                            f"{self.simplifications!r}: {error}")
        return name

    def _splits(self, name: str) -> dict[str, list[int]]:
        if name not in _SPLIT_CACHE:
            self._load(f"{name}:0")  # the server lists the variations of the loaded task
            _SPLIT_CACHE[name] = {"train": list(self._server.getVariationsTrain()),
                                  "dev": list(self._server.getVariationsDev()),
                                  "test": list(self._server.getVariationsTest())}
        return _SPLIT_CACHE[name]

    def tasks(self, split: str) -> list[TaskSpec]:
        """Tasks in `task_names` order, variations ascending. Listing a task's variations the first
        time in this process loads it in the JVM, which ends the running episode."""
        if split not in self.SPLITS:
            raise SandError(f"unknown ScienceWorld split {split!r}; valid splits: {', '.join(self.SPLITS)}")
        return [TaskSpec(env=self.name, task=name, task_id=f"{name}:{v}", split=split)
                for name in self.task_names
                for v in self._splits(name)[split][:self.variations_per_task]]

    def reset(self, task: TaskSpec) -> str:
        if task.env != self.name:
            raise SandError(f"task {task.task_id!r} belongs to env {task.env!r}, not {self.name!r}")
        # Reloading the variation restores its initial state and reseeds the simulator's random
        # generator, which is what makes replay deterministic.
        self._task = self._load(task.task_id)
        self._steps = 0
        self._score = 0.0
        # The free look does not advance the simulation; it is what "look around" answers.
        return f"{self._server.getTaskDescription().strip()}\n\n{self._server.freeActionLook().strip()}"

    def step(self, action: str) -> StepResult:
        if self._task is None:
            raise SandError("no ScienceWorld episode is running: call reset(task) first")
        observation = self._server.step(action).strip()
        raw = self._server.getScore()  # 0..1, -1 once the task has failed
        self._steps += 1
        # The paper's metric: the best score reached so far, in whole percent as ScienceWorld reports it.
        self._score = max(self._score, round(100 * raw) / 100)
        done = self._server.getCompleted() or raw < 0 or self._steps >= self.max_steps
        return StepResult(observation, self._score, done, not observation.startswith(_NOT_UNDERSTOOD))

    def admissible_actions(self) -> list[str]:
        if self._task is None:
            raise SandError("no ScienceWorld episode is running: call reset(task) first")
        return list(self._server.getValidActionObjectCombinations())

    @property
    def max_steps(self) -> int:
        if self._task is None:
            raise SandError("no ScienceWorld episode is running: call reset(task) first")
        return _load_limits()[self._task]

    @property
    def score(self) -> float:
        return self._score

    def expert_actions(self, task: TaskSpec) -> list[str]:
        """The simulator's gold action sequence. Generating it reloads the task, so this ends the
        running episode; call reset(task) before stepping.

        All sampled gold paths reach 100 (easy), often one step before their final `wait1`. Some
        (Mendelian genetics, a few test-conductivity) contain steps the parser rejects, e.g. an
        action sent while a disambiguation prompt awaits a number; those steps come back valid=False.
        """
        self._task = None
        if task.task_id not in self._gold:
            self._load(task.task_id, gold_path=True)
            self._gold[task.task_id] = list(self._server.getGoldActionSequence())
        return list(self._gold[task.task_id])

    def close(self) -> None:
        self._close_jvm()

    def abort(self) -> None:
        """Kill the JVM (a stopped one too) and drop the connections, without asking the JVM anything."""
        found = self._close_jvm.detach()
        if found:
            _, _, (gateway, proc), _ = found
            proc.kill()
            proc.wait()
            gateway.close()

    def _stalled(self) -> None:
        self._timed_out = True
        self._proc.kill()

    def _fault(self, call: str, exc: Exception) -> EnvironmentFault:
        """Kill the JVM after a failed call; the error names the task and what happened."""
        code = self._proc.poll()
        self.abort()
        what = ("did not answer in time" if self._timed_out else
                f"died (exit status {code})" if code is not None else f"dropped its connection ({exc})")
        return EnvironmentFault(f"ScienceWorld JVM (pid {self._proc.pid}) {what} in {call}"
                                f"{f' on task {self._task_id!r}' if self._task_id else ''}")


def build_step_limits(samples_per_split: int = 3, path: Path = LIMITS_PATH) -> dict[str, int]:
    """Recompute the per-task step limits and write them to `path`.

    For each task, the gold paths (easy simplifications) of `samples_per_split` evenly spaced
    variations of each split are measured; the limit is twice the longest, rounded up to a multiple
    of 10, and at least 30, so an agent has room for detours the expert never makes. Gold paths are
    deterministic, so the table is reproducible; the default takes ~2.5 minutes.
    """
    longest = {}
    with ScienceWorldEnv() as env:
        for name in env.task_names:
            lengths = []
            for split in env.SPLITS:
                variations = env._splits(name)[split]
                sample = {variations[i * len(variations) // samples_per_split] for i in range(samples_per_split)}
                lengths += [len(env.expert_actions(TaskSpec(env.name, name, f"{name}:{v}", split)))
                            for v in sorted(sample)]
            longest[name] = max(lengths)
    limits = {name: max(30, math.ceil(2 * n / 10) * 10) for name, n in longest.items()}
    path.write_text(json.dumps({
        "rule": "max(30, 2 x longest gold path, rounded up to a multiple of 10); easy simplifications; "
                f"{samples_per_split} evenly spaced variations per split; see build_step_limits()",
        "longest_gold_path": longest,
        "limits": limits,
    }, indent=1) + "\n")
    _load_limits.cache_clear()
    return limits


if __name__ == "__main__":
    print(build_step_limits())
