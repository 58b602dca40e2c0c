"""LLaVA-NeXT (LLaVA-1.6): anyres images (a base view plus high-resolution tiles, with a newline token per row;
see anyres.py) in front of a Llama, Mistral or Qwen2/Qwen3 language model.

Each image is one budget unit of its own size; newline tokens are kept and not counted.
"""

import torch
from torch import nn

from .anyres import AnyresAdapter, images_from_sizes
from .base import EntryCall


class LlavaNextAdapter(AnyresAdapter):
    family = "llava-next"
    classes = "LlavaNextForConditionalGeneration with a Llama, Mistral, Qwen2 or Qwen3 language model"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from transformers import LlavaNextForConditionalGeneration, LlavaNextModel

        return isinstance(model, (LlavaNextForConditionalGeneration, LlavaNextModel))

    def __init__(self, model: nn.Module):
        from transformers import LlavaNextForConditionalGeneration

        self.attach(model, LlavaNextForConditionalGeneration)

    def units_of_call(self, arguments: dict, call: EntryCall):
        features = (arguments.get("mm_encoder_outputs") or {}).get("image")
        return [self.placeholders(call, self.image_token_id)], [self.image_units(arguments, features)]

    def image_newlines_from_sizes(self, arguments: dict) -> list[torch.Tensor]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        image_sizes = arguments["image_sizes"]
        pinpoints, vision_size = self.config.image_grid_pinpoints, self.config.vision_config.image_size
        patches = [image_size_to_num_patches(size, pinpoints, vision_size) for size in image_sizes]
        strategy = arguments.get("vision_feature_select_strategy") or self.config.vision_feature_select_strategy
        return images_from_sizes(
            self.entry_module, image_sizes, patches, self.side, vision_feature_select_strategy=strategy
        )
