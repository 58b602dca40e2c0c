"""LLaVA-NeXT (LLaVA-1.6): anyres images (a base view plus high-resolution tiles, with a newline token per row;
see anyres.py) in front of a Llama, Mistral or Qwen2/Qwen3 language model.

Each image is one budget unit of its own size; newline tokens are kept and not counted.
"""

import inspect

import torch
from torch import nn

from .anyres import AnyresAdapter, images_from_sizes
from .base import EntryCall, ModelAdapter, bind_arguments


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

    # VisionZip-style methods: the tower runs on each image's base view and tiles; feature_packing maps each visual
    # token back to its tile's patch through the model's own packing (unpadding and newline tokens included)

    def vision_attention_module(self) -> nn.Module:
        return ModelAdapter.vision_attention_module(self)

    def feature_tower_module(self) -> nn.Module:
        return ModelAdapter.vision_tower_module(self)

    def feature_packing(self):
        return self.entry_module, "pack_image_features", packed_patch_sources

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


def packed_patch_sources(pack, args: tuple, kwargs: dict) -> torch.Tensor:
    """For a call of LLaVA-NeXT's `pack_image_features` (per image, its tiles' patch features [tiles, P, d]): the
    flat index (tower row * P + patch) of the patch each visual token holds, newline tokens left out, found by
    packing stand-in features that hold those indices (the packing only reorders, crops and inserts newlines)."""
    arguments = bind_arguments(inspect.signature(pack), args, kwargs)
    features = arguments["image_features"]
    stand_ins, first_row = [], 0
    for image in features:
        rows, patches = image.shape[:2]
        indices = torch.arange(first_row * patches, (first_row + rows) * patches, device=image.device)
        stand_ins.append(indices.view(rows, patches, 1).double())
        first_row += rows
    newline = torch.tensor([-1.0], dtype=torch.float64, device=features[0].device)
    packed, _ = pack(stand_ins, arguments["image_sizes"], arguments["vision_feature_select_strategy"],
                     image_newline=newline)
    flat = torch.cat([image[:, 0] for image in packed])
    return flat[flat >= 0].long()
