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
    return TrainSpec(**{"base_model": str(tiny_model()), "data": [str(data)], "output_dir": str(out), "max_steps": 2,
                        "per_device_batch_size": 1, "gradient_accumulation_steps": 1, "max_length": 512, **kw})


def test_windows_keep_the_instruction_and_end_at_an_assistant_turn():
    [long] = [t for t in load_eto(DATA / "eto_alfworld_sample.json", "alfworld") if len(t.steps) == 6]
    examples = [ex["prompt"] + ex["completion"] for ex in training_examples([long], history_steps=4)]
    assert len(examples) == 2
    for ex in examples:
        assert ex[2]["content"] == long.instruction
        assert ex[-1]["role"] == "assistant"
    assert examples[1][3]["content"].endswith(long.steps[4].action)


def test_windows_longer_than_max_length_end_early_so_no_step_is_cut_off():
    from transformers import AutoTokenizer

    from sand.errors import SandError

    tokenizer = AutoTokenizer.from_pretrained(tiny_model())
    def length(messages):
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])

    [long] = [t for t in load_eto(DATA / "eto_alfworld_sample.json", "alfworld") if len(t.steps) == 6]
    def windows(**kw):
        return [ex["prompt"] + ex["completion"] for ex in training_examples([long], **kw)]

    [whole] = windows(history_steps=6)
    one_step = length(windows(history_steps=1)[0])
    # Room for the instruction and about three steps: the 6-step window becomes several, each within the limit,
    # and together they train every step exactly once, in order.
    limit = (one_step + length(whole)) // 2
    examples = windows(history_steps=6, length=length, max_length=limit)
    assert 2 <= len(examples) < 6 and all(length(ex) <= limit for ex in examples)
    trained = [m["content"] for ex in examples for m in ex[3:] if m["role"] == "assistant"]
    assert trained == [m["content"] for m in whole[3:] if m["role"] == "assistant"]
    # Each window is as long as the limit allows: one more step would not fit.
    first_steps = (len(examples[0]) - 3 + 1) // 2  # its turns: steps, and observations between them
    assert length(windows(history_steps=first_steps + 1)[0]) > limit
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


@pytest.mark.parametrize("bf16", [False, True])
def test_training_runs_in_either_precision_and_records_it(sand_home, data, tmp_path, bf16):
    metrics = train(spec(data, tmp_path / "ckpt", bf16=bf16))
    assert metrics["bf16"] is bf16 and metrics["steps"] == 2
    assert (tmp_path / "ckpt" / "adapter_model.safetensors").exists()


def test_only_the_agent_s_turns_carry_loss_not_the_header_s_ok(sand_home, data, tmp_path):
    from sand.training.sft import build_trainer

    trainer, _ = build_trainer(spec(data, tmp_path / "ckpt", history_steps=2), tmp_path / "partial")
    tokenizer = trainer.processing_class
    [long] = [t for t in load_eto(DATA / "eto_alfworld_sample.json", "alfworld") if len(t.steps) == 6]
    for example in trainer.train_dataset:
        trained = tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != -100])
        text = tokenizer.decode(example["input_ids"])
        assert "OK" in text and "OK" not in trained  # the header is context, never a target
        assert "Action:" in trained and "Observation:" not in trained and "Your task is to" not in trained
    windows = [tokenizer.decode([t for t, label in zip(e["input_ids"], e["labels"]) if label != -100])
               for e in trainer.train_dataset]
    assert any(long.steps[2].action in w for w in windows)  # a later window trains its own steps


def test_the_cpu_loss_is_trl_s_loss_computed_over_the_trained_positions_alone(sand_home, data, tmp_path):
    import torch
    from trl import SFTTrainer

    from sand.training.sft import build_trainer

    trainer, _ = build_trainer(spec(data, tmp_path / "ckpt", history_steps=2, per_device_batch_size=2),
                               tmp_path / "partial")
    assert type(trainer) is not SFTTrainer  # no GPU here: the scored-positions loss
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert (batch["labels"] == -100).float().mean() > 0.5  # most positions are context, not targets
    ours = trainer.compute_loss(trainer.model, dict(batch))
    theirs = SFTTrainer.compute_loss(trainer, trainer.model, dict(batch))
    assert torch.allclose(ours, theirs, rtol=1e-4), (ours, theirs)
