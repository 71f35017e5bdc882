"""The model layer: where weights come from, and generation backends behind one interface."""
from sand.models.backends import (
    Backend,
    Completion,
    OpenAIBackend,
    SamplingParams,
    TransformersBackend,
    VLLMBackend,
    make_backend,
)
from sand.models.registry import DEFAULT_MODEL, model_hash, resolve_model, tiny_model

__all__ = ["DEFAULT_MODEL", "Backend", "Completion", "OpenAIBackend", "SamplingParams", "TransformersBackend",
           "VLLMBackend", "make_backend", "model_hash", "resolve_model", "tiny_model"]
