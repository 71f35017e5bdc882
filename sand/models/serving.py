"""The serving policy: which backend plays an agent (the base model, a LoRA adapter on it, a merged model, or
a fully finetuned model) and which one plays the frozen critic and writer, and what identifies an agent.

A stage builds backends through a `BackendFactory`: (model, a folder or name, None: the base model; backend
settings, None: the experiment's) -> a new backend. Stages close every backend they build.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from sand.experiment import BackendConfig, Experiment
from sand.machine import machine_dtype
from sand.models.backends import Backend, make_backend, serves_adapters_merged
from sand.models.registry import merged_model, model_hash, resolve_model
from sand.store import DatasetRef, Store

BackendFactory = Callable[[str | None, BackendConfig | None], Backend]


def backend_settings(backend: BackendConfig) -> dict:
    """The backend's settings as they run on this machine: its options with the dtype filled in where the experiment
    names none (sand.machine; a server chooses its own). Work keys use these, so bf16 results are never reused as
    fp32 ones, and stages record them."""
    options = dict(backend.options)
    if backend.kind != "openai":
        options.setdefault("dtype", machine_dtype())
    return {"kind": backend.kind, "options": options}


def backend_factory(exp: Experiment, device: str | None = None) -> BackendFactory:
    """Backends on a model (None: the base model) with backend settings (None: the experiment's); `device`
    places transformers models."""

    def make(model: str | None = None, backend: BackendConfig | None = None) -> Backend:
        settings = backend_settings(backend or exp.backend)
        kind, options = settings["kind"], settings["options"]
        if kind == "openai":
            options.setdefault("model", model or exp.base_model)
            return make_backend("openai", **options)
        if kind == "transformers" and device:
            options.setdefault("device", device)
        return make_backend(kind, model_path=resolve_model(model or exp.base_model), **options)

    return make


def critic_model(exp: Experiment) -> str:
    """The frozen model that critiques candidates and writes deliberations."""
    return exp.sand.critic_model or exp.base_model


def critic_identity(exp: Experiment) -> str:
    """The critic's name and weights hash: critiques made by other weights are other work."""
    model = critic_model(exp)
    return f"{model}@{model_hash(resolve_model(model))}"


def agent_token_counter(exp: Experiment, critic: Backend) -> Callable[[str], int]:
    """Counts text in the agent's tokens: with the critic's backend when it serves the agent's base model."""
    if critic_model(exp) == exp.base_model:
        return critic.count_tokens
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(exp.base_model))
    return lambda text: len(tokenizer(text).input_ids)


def agent_identity(exp: Experiment, checkpoint_path: str | None) -> str:
    """What the agent's weights are: the base model's hash, or the checkpoint folder (named by its training)."""
    if checkpoint_path is None:
        return f"base@{model_hash(resolve_model(exp.base_model))}"
    return Path(checkpoint_path).name


@contextmanager
def agent_backend(exp: Experiment, store: Store, checkpoint: DatasetRef | None,
                  backends: BackendFactory) -> Iterator[tuple[Backend, str | None]]:
    """(backend, adapter) acting as the agent of `checkpoint` (None: the base model).

    A LoRA checkpoint is an adapter on the base model's backend, or, where adapters are slow to serve, a
    merged model of its own; a fully finetuned one is a model of its own."""
    if checkpoint is None:
        with backends(None, None) as backend:
            yield backend, None
        return
    row = store.read("checkpoints", checkpoint.dataset, checkpoint.version).row(0, named=True)
    path = str(store.resolve(row["path"]))
    if row["lora"] and serves_adapters_merged(exp.backend.kind):
        dtype = backend_settings(exp.backend)["options"]["dtype"]
        with backends(str(merged_model(exp.base_model, path, dtype)), None) as backend:
            yield backend, None
        return
    with backends(None if row["lora"] else path, None) as backend:
        yield backend, (path if row["lora"] else None)


def critic_backend(exp: Experiment, backends: BackendFactory, agent: Backend | None = None,
                   adapter: str | None = None):
    """A context giving the critic's (and writer's) backend: the agent's own when the agent is an adapter on
    the critic's weights served the same way (it then runs without the adapter), else a backend of its own."""
    if agent is not None and adapter is not None and critic_model(exp) == exp.base_model \
            and exp.sand.critic_backend in (None, exp.backend):
        return nullcontext(agent)
    return backends(critic_model(exp), exp.sand.critic_backend)
