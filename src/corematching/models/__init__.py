"""Model adapters: one per family; `adapter_for` picks the one that fits a model."""

from torch import nn

from ..errors import UnsupportedModelError
from .base import AttentionRule, EntryCall, FFNParts, ImageLayout, LayerInputs, ModelAdapter
from .causal_lm import CausalLMAdapter
from .gemma3 import Gemma3Adapter
from .idefics3 import Idefics3Adapter
from .internvl import InternVLAdapter
from .llava import LlavaLlamaAdapter
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .mistral3 import Mistral3Adapter
from .qwen_vl import QwenVLAdapter

ADAPTERS: list[type[ModelAdapter]] = [LlavaLlamaAdapter]
ADAPTERS.append(QwenVLAdapter)
ADAPTERS.append(Gemma3Adapter)
ADAPTERS.append(CausalLMAdapter)
ADAPTERS.append(LlavaNextAdapter)
ADAPTERS.append(LlavaOnevisionAdapter)
ADAPTERS.append(Idefics3Adapter)
ADAPTERS.append(InternVLAdapter)
ADAPTERS.append(Mistral3Adapter)


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for the model, or UnsupportedModelError naming what is missing."""
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter(model)
    supported = "; ".join(f"{adapter.family} ({adapter.classes})" for adapter in ADAPTERS)
    raise UnsupportedModelError(
        f"{type(model).__name__} is not supported: no adapter for it (supported families: {supported})"
    )


def supported_models() -> list[dict]:
    """The supported model families: [{"family": name, "classes": the transformers classes}, ...]."""
    return [{"family": adapter.family, "classes": adapter.classes} for adapter in ADAPTERS]


__all__ = [
    "ADAPTERS",
    "AttentionRule",
    "EntryCall",
    "FFNParts",
    "ImageLayout",
    "LayerInputs",
    "ModelAdapter",
    "adapter_for",
    "supported_models",
]
