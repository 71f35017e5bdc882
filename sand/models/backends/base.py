"""The generation interface every backend implements, and the pieces the backends share."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable
from dataclasses import dataclass, replace
from pathlib import Path

from sand.errors import SandError


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()  # honoured by every backend and excluded from the returned text
    seed: int | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) | "length"


class _Closing:
    """`with` support for objects released by `close()`."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Backend(_Closing, ABC):
    """A model behind `generate` / `choose` / `stream`. Every backend has the model's `tokenizer`, which renders
    prompts and counts their tokens, and its `context_length`: the most tokens a prompt and its completion may
    hold together (None where a server does not say; nothing is then fitted to it)."""

    tokenizer: object
    context_length: int | None = None

    @abstractmethod
    def generate(self, prompts: list[str], params: SamplingParams,
                 adapter: str | None = None) -> list[list[Completion]]:
        """For each prompt, in order, `params.n` completions; `adapter` is a LoRA folder (None = base weights)."""

    def render(self, messages: list[dict]) -> str:
        """The model's chat template applied to `messages`, ending with the assistant generation prompt."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def count_tokens(self, prompt: str) -> int:
        """The tokens of a rendered prompt, as `Completion.prompt_tokens` counts them."""
        return len(self.tokenizer(prompt).input_ids)

    @abstractmethod
    def choose(self, prompts: list[str], choices: list[str], adapter: str | None = None) -> list[str | None]:
        """For each prompt, the continuation among `choices` the model picks under constraint (greedy); None where
        a server ignored the constraint and wrote none of them."""

    def stream(self, params: SamplingParams, adapter: str | None = None) -> Stream:
        """Prompts submitted one at a time and answered as each finishes (one completion each; `params.n` is
        ignored). Here: everything submitted is answered by one `generate` call; engines that batch
        continuously answer each prompt as soon as it is done while the others keep decoding."""
        return _BatchStream(self, replace(params, n=1), adapter)

    def close(self) -> None:
        """Release the engine (processes, memory, connections)."""


class Stream(_Closing, ABC):
    @abstractmethod
    def submit(self, key: Hashable, prompt: str) -> None:
        """Queue `prompt`; its completion comes back from `finished` under `key`."""

    @abstractmethod
    def finished(self) -> list[tuple[Hashable, Completion]]:
        """Wait until at least one submitted prompt is answered and return every answered one ([] when
        nothing is pending)."""

    def close(self) -> None:
        """Drop what is still pending."""


class _BatchStream(Stream):
    def __init__(self, backend: Backend, params: SamplingParams, adapter: str | None):
        self.backend, self.params, self.adapter = backend, params, adapter
        self._pending: dict[Hashable, str] = {}

    def submit(self, key: Hashable, prompt: str) -> None:
        self._pending[key] = prompt

    def finished(self) -> list[tuple[Hashable, Completion]]:
        if not self._pending:
            return []
        keys, prompts = list(self._pending), list(self._pending.values())
        self._pending.clear()
        return [(k, c) for k, [c] in zip(keys, self.backend.generate(prompts, self.params, self.adapter))]


def _trim(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """Text up to the earliest stop string, and whether one occurred."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _chosen(text: str, choices: list[str]) -> str | None:
    """The choice a constrained reply is (None: the reply is none of them)."""
    return next((c for c in choices if c == text), None) or \
        next((c for c in choices if c.strip() == text.strip()), None)


def _distinct(params: SamplingParams) -> int:
    """How many samples to compute: greedy samples are identical (and vLLM refuses n > 1 without sampling)."""
    return 1 if params.temperature == 0 else params.n


def _repeat_greedy(completions: list[Completion], params: SamplingParams) -> list[Completion]:
    return completions * params.n if params.temperature == 0 else completions


def adapter_key(adapter: str) -> tuple[str, int]:
    """(resolved folder, weights mtime): a rewritten adapter gets a new key, so no engine serves it stale."""
    folder = Path(adapter).expanduser().resolve()
    if not (folder / "adapter_config.json").exists():
        raise SandError(f"LoRA adapter {folder} is not a PEFT adapter folder (no adapter_config.json)")
    weights = sorted(folder.glob("adapter_model.*")) or [folder / "adapter_config.json"]
    return str(folder), weights[0].stat().st_mtime_ns

