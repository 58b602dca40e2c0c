"""Model adapters: one per family; `adapter_for` picks the one that fits a model."""

from torch import nn

from ..errors import UnsupportedModelError
from .base import AttentionRule, EntryCall, FFNParts, ImageLayout, LayerInputs, ModelAdapter
from .llava import LlavaLlamaAdapter

ADAPTERS: list[type[ModelAdapter]] = [LlavaLlamaAdapter]


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for the model, or UnsupportedModelError naming what is missing."""
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter(model)
    supported = ", ".join(adapter.family for adapter in ADAPTERS)
    raise UnsupportedModelError(
        f"{type(model).__name__} is not supported: no adapter for it (supported families: {supported}; "
        "LLaVA means LlavaForConditionalGeneration with a Llama language model)"
    )


__all__ = [
    "ADAPTERS",
    "AttentionRule",
    "EntryCall",
    "FFNParts",
    "ImageLayout",
    "LayerInputs",
    "ModelAdapter",
    "adapter_for",
]
