"""Model registry: the embedded default (converted from GGUF), the tiny test model, hashes, the chat template."""
import json
import time

import pytest
import torch

from sand.errors import SandError
from sand.models import SamplingParams, TransformersBackend, model_hash, resolve_model, tiny_model

torch.set_num_threads(1)

# SmolLM2-135M-Instruct's own chat template, as its GGUF ships it: ours must render the same text.
ORIGINAL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>'"
    " + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt "
    "%}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "You are an agent."},
    {"role": "user", "content": "Your task is to: find a mug."},
    {"role": "assistant", "content": "Think: look on the shelf.\nAction: go to shelf 1"},
    {"role": "user", "content": "You see a mug 1."},
    {"role": "assistant", "content": "Action: take mug 1 from shelf 1"},
]


@pytest.mark.slow
def test_default_model_converts_once_and_answers(sand_home):
    started = time.monotonic()
    folder = resolve_model("smollm2-135m")
    converted = time.monotonic() - started
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["dtype"] == "bfloat16" and "quantization_config" not in config
    assert (folder / "model.safetensors").stat().st_size > 200e6
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left behind

    started = time.monotonic()
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == folder
    assert time.monotonic() - started < 0.5 < converted

    engine = TransformersBackend(folder)
    prompt = engine.render([{"role": "user", "content": "What is the capital of France?"}])
    answer = engine.generate([prompt], SamplingParams(max_new_tokens=16))[0][0]
    assert "Paris" in answer.text


def test_tiny_model_is_small_deterministic_and_built_once(sand_home, tmp_path):
    from transformers import AutoModelForCausalLM

    first = tiny_model()
    assert first.parent.name == "models"
    built_at = (first / "model.safetensors").stat().st_mtime_ns
    assert tiny_model() == first and (first / "model.safetensors").stat().st_mtime_ns == built_at
    again = tiny_model(tmp_path / "elsewhere")
    assert model_hash(again) == model_hash(first)  # seeded: the same weights everywhere
    model = AutoModelForCausalLM.from_pretrained(first)
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert 3e6 < sum(p.numel() for p in model.parameters()) < 4e6


def test_model_hash_tracks_content_and_is_cached(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(4)}, tmp_path / "model.safetensors")
    first = model_hash(tmp_path)
    cache = json.loads((tmp_path / ".sand_hash.json").read_text())
    assert cache["sha256"] == first and model_hash(tmp_path) == first
    # While size and mtime are unchanged the cached value is trusted, not recomputed.
    (tmp_path / ".sand_hash.json").write_text(json.dumps({**cache, "sha256": "cached"}))
    assert model_hash(tmp_path) == "cached"
    save_file({"w": torch.ones(4)}, tmp_path / "model.safetensors")
    assert model_hash(tmp_path) not in (first, "cached")
    with pytest.raises(SandError, match="safetensors"):
        model_hash(tmp_path / "missing")


def test_chat_template_masks_exactly_the_assistant_turns(sand_home):
    from transformers import AutoTokenizer
    from trl.chat_template_utils import get_training_chat_template, is_chat_template_stop_token_trained

    tokenizer = AutoTokenizer.from_pretrained(tiny_model())
    for messages in (CONVERSATION, CONVERSATION[1:], CONVERSATION[:2]):
        for generation_prompt in (False, True):
            ours = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
            assert ours == tokenizer.apply_chat_template(messages, tokenize=False, chat_template=ORIGINAL_TEMPLATE,
                                                         add_generation_prompt=generation_prompt)
    encoded = tokenizer.apply_chat_template(CONVERSATION, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    spans, start = [], None
    for k, bit in enumerate([*mask, 0]):
        if bit and start is None:
            start = k
        elif not bit and start is not None:
            spans.append(tokenizer.decode(ids[start:k]))
            start = None
    assert spans == [m["content"] + "<|im_end|>" for m in CONVERSATION if m["role"] == "assistant"]
    # TRL accepts it for assistant_only_loss as is, and sees the end-of-turn token trained.
    assert get_training_chat_template(tokenizer) is None
    assert is_chat_template_stop_token_trained(tokenizer)


def test_resolve_model_folders_and_errors(tmp_path, sand_home):
    model = tiny_model(tmp_path / "tiny")
    assert resolve_model(str(model)) == model.resolve()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SandError, match="no config.json"):
        resolve_model(tmp_path / "empty")
    with pytest.raises(SandError, match="not in the Hugging Face cache"):
        resolve_model("sand-tests/no-such-model")
    with pytest.raises(SandError, match="not in the Hugging Face cache"):
        resolve_model(str(tmp_path / "missing" / "folder"))
