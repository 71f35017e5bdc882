"""OpenAI-compatible `/v1/completions` servers (vllm serve, SGLang, TGI, llama.cpp server)."""
from __future__ import annotations

import hashlib
import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sand.errors import SandError
from sand.models.backends.base import (
    Backend,
    Completion,
    SamplingParams,
    _chosen,
    _distinct,
    _repeat_greedy,
    _trim,
    adapter_key,
)
from sand.models.registry import resolve_model


class OpenAIBackend(Backend):
    """An OpenAI-compatible `/v1/completions` fleet (vllm serve, SGLang, TGI, llama.cpp server).

    Requests (one per prompt) go round robin over `base_urls` from a thread pool; connection errors, 429 and 5xx
    are retried with exponential backoff on the next server. An adapter that is a local folder is loaded into
    each server on first use through vLLM's `/v1/load_lora_adapter` (needs `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`
    and the folder visible to the servers); any other adapter string is a name the servers already serve.
    `tokenizer` (a model folder or name, default `model`) renders prompts and counts their tokens. The context
    prompts are fitted to is `max_model_len`, or else what the servers' `/v1/models` report for `model`
    (vLLM does; with neither, prompts are not fitted).
    """

    def __init__(self, base_urls: list[str], model: str, api_key: str | None = None, timeout: float = 600.0,
                 max_retries: int = 4, concurrency: int = 16, tokenizer: str | Path | None = None,
                 max_model_len: int | None = None):
        import httpx

        if not base_urls:
            raise SandError("the openai backend needs at least one base URL, e.g. http://127.0.0.1:8000")
        self.urls = [u.rstrip("/").removesuffix("/v1") for u in base_urls]
        self.model, self.max_retries = model, max_retries
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=timeout, headers=headers,
                                    limits=httpx.Limits(max_connections=concurrency))
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="sand-openai")
        self._turn = itertools.count()
        self._tokenizer_source, self._tokenizer = tokenizer or model, None
        self._context = max_model_len or self._served_context()
        self._loaded: set[tuple[str, str]] = set()  # (server, adapter name) pairs already loaded
        self._lock = threading.Lock()

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(resolve_model(self._tokenizer_source))
        return self._tokenizer

    @property
    def context_length(self) -> int | None:
        return self._context

    def _served_context(self) -> int | None:
        """`max_model_len` of `model` as the first server that answers `/v1/models` reports it."""
        import httpx

        for url in self.urls:
            try:
                models = self._client.get(f"{url}/v1/models").json().get("data", [])
            except (httpx.HTTPError, ValueError):  # down, or not JSON: the completions calls will say so
                continue
            return next((m.get("max_model_len") for m in models if m.get("id") == self.model), None)
        return None

    def generate(self, prompts: list[str], params: SamplingParams,
                 adapter: str | None = None) -> list[list[Completion]]:
        body = {"prompt": "", "n": _distinct(params), "temperature": params.temperature, "top_p": params.top_p,
                "max_tokens": params.max_new_tokens}
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        if body["n"] > 1:
            body["logprobs"] = 0  # per-choice token lists: `usage` only totals the n choices
        futures = [self._pool.submit(self._complete, {**body, "prompt": p}, params, adapter) for p in prompts]
        return [f.result() for f in futures]

    def choose(self, prompts: list[str], choices: list[str], adapter: str | None = None) -> list[str | None]:
        """Greedy decoding constrained to `choices` by the server: vLLM's `structured_outputs` (a server that
        ignores it may answer none of them: None)."""
        params = SamplingParams(max_new_tokens=max(len(c) for c in choices) + 1)  # a token has at least 1 character
        body = {"n": 1, "temperature": 0.0, "max_tokens": params.max_new_tokens,
                "structured_outputs": {"choice": list(choices)}}
        futures = [self._pool.submit(self._complete, {**body, "prompt": p}, params, adapter) for p in prompts]
        return [_chosen(f.result()[0].text, choices) for f in futures]

    def _complete(self, body: dict, params: SamplingParams, adapter: str | None) -> list[Completion]:
        import httpx

        first = next(self._turn)
        for attempt in range(self.max_retries + 1):
            url = self.urls[(first + attempt) % len(self.urls)]
            try:
                response = self._client.post(f"{url}/v1/completions",
                                             json={**body, "model": self._model_name(url, adapter)})
            except httpx.HTTPError as error:  # connection failures, and a 5xx while loading an adapter
                failure = f"{type(error).__name__}: {error}"
            else:
                if response.status_code != 429 and response.status_code < 500:
                    if response.is_error:
                        raise SandError(f"{url}/v1/completions refused the request: HTTP {response.status_code} "
                                        f"{response.text[:500]}")
                    return _repeat_greedy(_parse_choices(response.json(), params.stop), params)
                failure = f"HTTP {response.status_code} {response.text[:200]}"
            if attempt < self.max_retries:
                time.sleep(min(0.5 * 2 ** attempt, 8.0))
        raise SandError(f"completion failed after {self.max_retries + 1} attempts over {self.urls}: {failure}")

    def _model_name(self, url: str, adapter: str | None) -> str:
        if adapter is None:
            return self.model
        if not Path(adapter).expanduser().is_dir():
            return adapter  # an adapter name the server was started with
        folder, mtime = adapter_key(adapter)
        name = "sand-" + hashlib.sha1(f"{folder}:{mtime}".encode()).hexdigest()[:16]
        with self._lock:
            if (url, name) not in self._loaded:
                response = self._client.post(f"{url}/v1/load_lora_adapter",
                                             json={"lora_name": name, "lora_path": folder})
                if response.status_code >= 500:
                    response.raise_for_status()  # retried by the caller like any server failure
                if response.is_error and "already" not in response.text:
                    raise SandError(f"{url} could not load LoRA adapter {folder}: HTTP {response.status_code} "
                                    f"{response.text[:300]} (a vLLM server loads adapters at runtime only with "
                                    "--enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)")
                self._loaded.add((url, name))
        return name

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()


def _parse_choices(data: dict, stop: tuple[str, ...]) -> list[Completion]:
    choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
    usage = data.get("usage") or {}
    completions = []
    for choice in choices:
        logprobs = choice.get("logprobs") or {}
        tokens = len(logprobs["tokens"]) if logprobs.get("tokens") is not None else \
            usage.get("completion_tokens", 0) // len(choices)
        text, _ = _trim(choice["text"], stop)  # some servers keep the stop string
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        completions.append(Completion(text, usage.get("prompt_tokens", 0), tokens, finish))
    return completions

