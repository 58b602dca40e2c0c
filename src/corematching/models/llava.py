"""LLaVA-1.5 layout: a vision tower and projector in front of a Llama language model.

Supports `LlavaForConditionalGeneration` (and a bare `LlavaModel`) from transformers 5.x whose language model
is a Llama, Mistral or Qwen2/Qwen3 decoder (SwiGLU FFN, 1-D RoPE).
"""

import inspect

from torch import nn

from ..errors import UnsupportedModelError
from .base import EntryCall, bind_arguments, entry_call_from
from .decoder_lm import DecoderLanguageModelAdapter

# The language models of the LLaVA families (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision checkpoints use these).
LLAVA_LANGUAGE_MODELS = ("LlamaModel", "MistralModel", "Qwen2Model", "Qwen3Model")


def image_token_id_of(model: nn.Module, config) -> int:
    """The placeholder id of image tokens (`image_token_id`, or the older `image_token_index`)."""
    image_token_id = getattr(config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = getattr(config, "image_token_index", None)
    if image_token_id is None:
        raise UnsupportedModelError(
            f"{type(model).__name__}: the config has neither image_token_id nor image_token_index"
        )
    return int(image_token_id)


def read_llava_call(signature: inspect.Signature, args: tuple, kwargs: dict, images: str = "image") -> EntryCall:
    """An entry call of the LLaVA layout: pixel_values, or pre-encoded features in mm_encoder_outputs[images]."""
    arguments = bind_arguments(signature, args, kwargs)
    image_inputs = arguments.get("pixel_values")
    if image_inputs is None:
        encoded = arguments.get("mm_encoder_outputs")
        image_inputs = encoded.get(images) if isinstance(encoded, dict) else encoded
    return entry_call_from(arguments, image_inputs)


class LlavaLlamaAdapter(DecoderLanguageModelAdapter):
    family = "llava"
    classes = "LlavaForConditionalGeneration with a Llama, Mistral, Qwen2 or Qwen3 language model"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from transformers import LlavaForConditionalGeneration, LlavaModel

        return isinstance(model, (LlavaForConditionalGeneration, LlavaModel))

    def __init__(self, model: nn.Module):
        from transformers import LlavaForConditionalGeneration

        self.model = model
        self.entry_module = model.model if isinstance(model, LlavaForConditionalGeneration) else model
        self.attach_language_model(getattr(self.entry_module, "language_model", None), LLAVA_LANGUAGE_MODELS)
        config = self.entry_module.config
        self.image_token_id = image_token_id_of(model, config)

        vision = config.vision_config
        image_size, patch_size = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
        if image_size and patch_size:
            side = int(image_size) // int(patch_size)
            self.image_grid = (side, side)
            with_cls = getattr(config, "vision_feature_select_strategy", "default") == "full"
            self.tokens_per_image = side * side + int(with_cls)
        self._entry_signature = inspect.signature(self.entry_module.forward)
        self.check_attention()

    def read_entry_call(self, args: tuple, kwargs: dict) -> EntryCall:
        return read_llava_call(self._entry_signature, args, kwargs)
