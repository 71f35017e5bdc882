"""In-process generation with transformers (CPU or GPU), LoRA adapters through PEFT."""
from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from pathlib import Path

from sand.machine import machine_dtype
from sand.models.backends.base import (
    Backend,
    Completion,
    SamplingParams,
    _distinct,
    _repeat_greedy,
    _trim,
    adapter_key,
)
from sand.models.registry import resolve_model


class TransformersBackend(Backend):
    """In-process transformers generation: left-padded batches, one `generate` call per batch.

    `batch_size` counts sequences (prompts x n) per call. Prompts are batched by length to waste little padding.
    With a seed, a call is reproducible for the same prompts and batch size (one torch RNG per call).
    `dtype` is a torch dtype or its name, "auto" (the checkpoint's) or None (this machine's: sand.machine).
    `max_model_len` (default: the model's `max_position_embeddings`) is the context prompts are fitted to. Calls
    from several threads take turns, since the active adapter is state of the shared model.
    """

    def __init__(self, model_path: str | Path, device: str = "auto", dtype: str | None = None,
                 batch_size: int = 32, max_adapters: int = 4, max_model_len: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_model(model_path)
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or machine_dtype()).to(self.device).eval()
        self.context_length = max_model_len or getattr(self.model.config, "max_position_embeddings", None)
        eos = self.model.generation_config.eos_token_id
        self._eos = sorted({*(eos if isinstance(eos, list) else [eos]), self.tokenizer.eos_token_id} - {None})
        # Finished rows are padded with pad_token_id: the first pad or EOS marks where a completion ends.
        self._end_ids = {*self._eos, self.tokenizer.pad_token_id}
        self.batch_size, self.max_adapters = batch_size, max_adapters
        self._peft = None  # the PeftModel wrapping self.model once an adapter is loaded
        self._adapters: OrderedDict[tuple[str, int], str] = OrderedDict()  # key -> peft adapter name, LRU order
        self._names = itertools.count()
        self._lock = threading.Lock()

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

    def choose(self, prompts: list[str], choices: list[str], adapter: str | None = None) -> list[str | None]:
        """For each prompt, the choice the model finds likeliest as its continuation (the sum of its tokens'
        log-probabilities, all choices scored in one forward pass per batch): never None."""
        import torch

        options = [self.tokenizer(c, add_special_tokens=False).input_ids for c in choices]
        rows = [self.tokenizer(p).input_ids + o for p in prompts for o in options]
        keep = max(len(o) for o in options) + 1  # logits of the last positions only: the vocabulary is wide
        scores: list[float] = []
        with self._lock, self._use_adapter(adapter), torch.inference_mode():
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start:start + self.batch_size]
                batch = self.tokenizer.pad({"input_ids": chunk}, return_tensors="pt").to(self.device)  # left-padded
                positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
                logits = (self._peft or self.model)(**batch, position_ids=positions, logits_to_keep=keep).logits
                logprobs = torch.log_softmax(logits.float(), dim=-1)
                for k in range(len(chunk)):
                    option = options[(start + k) % len(options)]
                    # The option's tokens end the row; position keep-1-len+r of the kept logits predicts token r.
                    at = torch.arange(keep - 1 - len(option), keep - 1, device=logprobs.device)
                    scores.append(logprobs[k, at, torch.tensor(option, device=logprobs.device)].sum().item())
        n = len(options)
        return [choices[max(range(n), key=lambda j: scores[i * n + j])] for i in range(len(prompts))]

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

        key = adapter_key(adapter)
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

