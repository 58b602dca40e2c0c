"""LLaVA-OneVision: anyres images (see anyres.py; images of a multi-image sample are base views only, as the
model does) and videos (frames pooled 2 x 2, then one newline token) in front of a Qwen2 (or Llama, Mistral,
Qwen3) language model.

Each image and each video is one budget unit; a video's frames are stacked into one grid of frames x side rows.
Newline tokens are kept and not counted.
"""

import torch
from torch import nn

from .anyres import AnyresAdapter, UnitTokens, images_from_sizes, pooled_side
from .base import EntryCall


class LlavaOnevisionAdapter(AnyresAdapter):
    family = "llava-onevision"
    classes = "LlavaOnevisionForConditionalGeneration (images and videos)"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel

        return isinstance(model, (LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel))

    def __init__(self, model: nn.Module):
        from transformers import LlavaOnevisionForConditionalGeneration

        self.attach(model, LlavaOnevisionForConditionalGeneration)
        self.video_token_id = int(self.config.video_token_id)

    def visual_token_ids(self) -> tuple[int, ...]:
        return (self.image_token_id, self.video_token_id)

    def video_inputs(self, arguments: dict):
        videos = arguments.get("pixel_values_videos")
        return videos if videos is not None else (arguments.get("mm_encoder_outputs") or {}).get("video")

    def units_of_call(self, arguments: dict, call: EntryCall):
        encoded = arguments.get("mm_encoder_outputs") or {}
        images, videos = [], []
        if arguments.get("pixel_values") is not None or encoded.get("image") is not None:
            images = self.image_units(arguments, encoded.get("image"))
        if arguments.get("pixel_values_videos") is not None or encoded.get("video") is not None:
            videos = self.video_units(arguments, encoded.get("video"))
        placeholders = [self.placeholders(call, self.image_token_id), self.placeholders(call, self.video_token_id)]
        return placeholders, [images, videos]

    def video_units(self, arguments: dict, features) -> list[UnitTokens]:
        """Each video: its frames' pooled tokens, then one newline token."""
        side = pooled_side(self.side)
        if features is not None:
            num_videos, length = features.pooler_output.shape[:2]
            frames = (length - 1) // (side * side)
        else:
            num_videos, frames = arguments["pixel_values_videos"].shape[:2]
            length = frames * side * side + 1
        newline = torch.zeros(length, dtype=torch.bool)
        newline[-1] = True
        return [UnitTokens(newline=newline, grid=(frames * side, side)) for _ in range(num_videos)]

    def image_newlines_from_sizes(self, arguments: dict) -> list[torch.Tensor]:
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        image_sizes = arguments["image_sizes"]
        per_sample = arguments.get("batch_num_images")
        # the model tiles an image only when it is its sample's one image (every image without batch_num_images)
        tiled = [True] * len(image_sizes) if per_sample is None else [n == 1 for n in per_sample for _ in range(n)]
        vision_size = self.config.vision_config.image_size
        patches = [
            image_size_to_num_patches(size, self.config.image_grid_pinpoints, vision_size) if tile else 1
            for size, tile in zip(image_sizes, tiled)
        ]
        aspect_ratio = arguments.get("vision_aspect_ratio") or self.config.vision_aspect_ratio
        return images_from_sizes(self.entry_module, image_sizes, patches, self.side, vision_aspect_ratio=aspect_ratio)
