"""SFT with TRL on the tiny model: real training steps, atomic checkpoints, continuation."""
import json

import pytest

from sand.formats.eto import load_eto
from sand.models.registry import tiny_model
from sand.training.sft import TrainSpec, train, training_examples
from sand.trajectory import to_frame
from tests.conftest import DATA


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "d.parquet"
    to_frame(load_eto(DATA / "eto_alfworld_sample.json", "alfworld")).write_parquet(path)
    return path


def spec(data, out, **kw) -> TrainSpec:
    return TrainSpec(base_model=str(tiny_model()), data=[str(data)], output_dir=str(out), max_steps=2,
                     per_device_batch_size=1, gradient_accumulation_steps=1, max_length=512, **kw)


def test_windows_keep_the_instruction_and_end_at_an_assistant_turn():
    [long] = [t for t in load_eto(DATA / "eto_alfworld_sample.json", "alfworld") if len(t.steps) == 6]
    examples = training_examples([long], history_steps=4)
    assert len(examples) == 2
    for ex in examples:
        assert ex["messages"][2]["content"] == long.instruction
        assert ex["messages"][-1]["role"] == "assistant"
    assert examples[1]["messages"][3]["content"].endswith(long.steps[4].action)


def test_windows_longer_than_max_length_end_early_so_no_step_is_cut_off():
    from transformers import AutoTokenizer

    from sand.errors import SandError

    tokenizer = AutoTokenizer.from_pretrained(tiny_model())
    def length(messages):
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])

    [long] = [t for t in load_eto(DATA / "eto_alfworld_sample.json", "alfworld") if len(t.steps) == 6]
    [whole] = training_examples([long], history_steps=6)
    one_step = length(training_examples([long], history_steps=1)[0]["messages"])
    # Room for the instruction and about three steps: the 6-step window becomes several, each within the limit,
    # and together they train every step exactly once, in order.
    limit = (one_step + length(whole["messages"])) // 2
    examples = training_examples([long], history_steps=6, length=length, max_length=limit)
    assert 2 <= len(examples) < 6 and all(length(ex["messages"]) <= limit for ex in examples)
    trained = [m["content"] for ex in examples for m in ex["messages"][3:] if m["role"] == "assistant"]
    assert trained == [m["content"] for m in whole["messages"][3:] if m["role"] == "assistant"]
    # Each window is as long as the limit allows: one more step would not fit.
    first_steps = (len(examples[0]["messages"]) - 3 + 1) // 2  # its turns: steps, and observations between them
    assert length(training_examples([long], history_steps=first_steps + 1)[0]["messages"]) > limit
    with pytest.raises(SandError, match=rf"alfworld trajectory {long.id}, step 1: .* more than train.max_length"):
        training_examples([long], history_steps=6, length=length, max_length=one_step - 1)


def test_train_writes_a_complete_adapter_and_is_idempotent(sand_home, data, tmp_path):
    out = tmp_path / "ckpt"
    metrics = train(spec(data, out))
    assert metrics["steps"] == 2 and len(metrics["loss_curve"]) == 2
    assert (out / "adapter_model.safetensors").exists() and (out / "train_metrics.json").exists()
    assert not out.with_name("ckpt.partial").exists()
    stamp = (out / "adapter_model.safetensors").stat().st_mtime_ns
    assert train(spec(data, out)) == json.loads((out / "train_metrics.json").read_text())
    assert (out / "adapter_model.safetensors").stat().st_mtime_ns == stamp  # not retrained

    # Continuing from the checkpoint starts from its weights: the first loss is the previous last loss's
    # neighbourhood, not the base model's.
    cont = train(spec(data, tmp_path / "ckpt2", init_checkpoint=str(out)))
    assert cont["steps"] == 2 and cont["loss_curve"][0]["loss"] < metrics["loss_curve"][0]["loss"]
