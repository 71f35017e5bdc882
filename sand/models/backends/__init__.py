"""Generation backends behind one interface: transformers, the vLLM offline engine, OpenAI-compatible servers.

Prompts arrive already rendered (`Backend.render`), so every backend sees the same text and servers can reuse
cached prefixes. LoRA adapters are addressed by folder; an adapter folder is identified by its path and the
mtime of its weights, so rewriting an adapter in place is picked up instead of served stale.
"""
from sand.errors import SandError
from sand.models.backends.base import Backend, Completion, SamplingParams, Stream, adapter_key
from sand.models.backends.openai import OpenAIBackend
from sand.models.backends.transformers import TransformersBackend
from sand.models.backends.vllm import VLLMBackend, serves_adapters_merged

__all__ = ["Backend", "Completion", "OpenAIBackend", "SamplingParams", "Stream", "TransformersBackend",
           "VLLMBackend", "adapter_key", "make_backend", "serves_adapters_merged"]

_BACKENDS = {"transformers": TransformersBackend, "vllm": VLLMBackend, "openai": OpenAIBackend}


def make_backend(kind: str, **options) -> Backend:
    """A backend by name: "transformers", "vllm" or "openai"; options go to its constructor."""
    if kind not in _BACKENDS:
        raise SandError(f"unknown generation backend '{kind}': choose one of {', '.join(_BACKENDS)}")
    return _BACKENDS[kind](**options)

