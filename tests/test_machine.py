"""The dtype chosen per machine: bf16 where the CPU computes it natively, fp32 where it is emulated; an
experiment's own choice wins; both paths generate and train; work keys and checkpoints name the choice."""
import importlib.util

import pytest

from sand import machine
from sand.experiment import BackendConfig, Experiment, TrainConfig
from sand.models import SamplingParams, make_backend, tiny_model
from sand.models.checkpoints import plan_training
from sand.models.serving import backend_settings
from sand.store import DatasetRef, Store

AVX2 = frozenset({"avx", "avx2", "fma"})
AVX512_BF16 = AVX2 | {"avx512f", "avx512_bf16"}


@pytest.fixture
def cpu(monkeypatch):
    """Makes this machine look like a CPU with the given flags (and no GPU)."""
    monkeypatch.setattr(machine, "_cuda", lambda: None)

    def have(flags):
        monkeypatch.setattr(machine, "cpu_flags", lambda: flags)
    return have


def test_bf16_only_where_the_cpu_computes_it(cpu):
    cpu(AVX2)
    assert machine.machine_dtype() == "float32" and not machine.native_bf16()
    cpu(AVX512_BF16)
    assert machine.machine_dtype() == "bfloat16" and machine.native_bf16()
    cpu(AVX2 | {"amx_bf16"})
    assert machine.machine_dtype() == "bfloat16"


def test_the_experiment_s_dtype_wins_and_the_choice_keys_the_work(cpu):
    cpu(AVX2)
    assert backend_settings(BackendConfig(kind="vllm"))["options"]["dtype"] == "float32"
    fp32_key = backend_settings(BackendConfig(kind="vllm"))
    cpu(AVX512_BF16)
    assert backend_settings(BackendConfig(kind="vllm")) != fp32_key  # bf16 results are other work
    assert backend_settings(BackendConfig(kind="transformers", options={"dtype": "float32"}))["options"] == {
        "dtype": "float32"}
    assert "dtype" not in backend_settings(BackendConfig(kind="openai"))["options"]  # a server chooses its own


def test_the_training_precision_names_the_checkpoint(cpu, tmp_path):
    store = Store(tmp_path)
    exp = Experiment(name="p", base_model=str(tiny_model(tmp_path / "tiny")))
    data = DatasetRef("trajectories", "p/d0", "v1")
    cpu(AVX2)
    fp32 = plan_training(exp, store, 0, data, None)
    cpu(AVX512_BF16)
    bf16 = plan_training(exp, store, 0, data, None)
    assert (fp32.spec.bf16, bf16.spec.bf16) == (False, True) and fp32.output != bf16.output
    pinned = exp.model_copy(update={"train": TrainConfig(bf16=False)})
    assert plan_training(pinned, store, 0, data, None).output == fp32.output  # a pinned choice: the same checkpoint


@pytest.mark.parametrize("kind", ["transformers", "vllm"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_each_dtype_generates(kind, dtype, tmp_path):
    if kind == "vllm" and importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    options = {"max_model_len": 512, "enable_lora": False} if kind == "vllm" else {}
    with make_backend(kind, model_path=tiny_model(tmp_path / "tiny"), dtype=dtype, **options) as backend:
        [[completion]] = backend.generate([backend.render([{"role": "user", "content": "hello"}])],
                                          SamplingParams(max_new_tokens=8))
    assert completion.completion_tokens > 0
