"""LLaVA-NeXT (LLaVA-1.6): anyres images (a base view plus high-resolution tiles, with a newline token per row;
see anyres.py) in front of a Llama, Mistral or Qwen2/Qwen3 language model.

Each image is one budget unit of its own size; newline tokens are kept and not counted.
"""

import inspect

import torch
from torch import nn

from .anyres import AnyresCall, UnitTokens, grid_of, images_from_sizes, layout_of_units, newline_rows, place_units
from .base import EntryCall, ImageLayout, bind_arguments
from .decoder_lm import DecoderLanguageModelAdapter
from .llava import LLAVA_LANGUAGE_MODELS, image_token_id_of, read_llava_call


class AnyresAdapter(DecoderLanguageModelAdapter):
    """What LLaVA-NeXT and LLaVA-OneVision share; subclasses say how a call's images (and videos) become tokens."""

    def attach(self, model: nn.Module, top_class: type) -> None:
        self.model = model
        self.entry_module = model.model if isinstance(model, top_class) else model
        self.attach_language_model(getattr(self.entry_module, "language_model", None), LLAVA_LANGUAGE_MODELS)
        self.config = self.entry_module.config
        self.image_token_id = image_token_id_of(model, self.config)
        vision = self.config.vision_config
        self.side = int(vision.image_size) // int(vision.patch_size)  # tokens per side of a base view / tile
        self._entry_signature = inspect.signature(self.entry_module.forward)
        self.check_attention()

    def units_of_call(self, arguments: dict, call: EntryCall) -> tuple[list[torch.Tensor], list[list[UnitTokens]]]:
        """(placeholder mask [B, T] per stream, the tokens of each stream's images or videos in order)."""
        raise NotImplementedError

    def read_entry_call(self, args: tuple, kwargs: dict) -> EntryCall:
        arguments = bind_arguments(self._entry_signature, args, kwargs)
        call = read_llava_call(self._entry_signature, args, kwargs)
        if call.image_inputs is None and (call.input_ids is not None or call.inputs_embeds is not None):
            call.image_inputs = self.video_inputs(arguments)
        if call.image_inputs is None or (call.input_ids is None and call.inputs_embeds is None):
            return call
        return place_units(call, *self.units_of_call(arguments, call))

    def video_inputs(self, arguments: dict):
        return None

    def placeholders(self, call: EntryCall, token_id: int) -> torch.Tensor:
        """Bool [B, T]: the call's placeholders of one token id."""
        if call.input_ids is not None:
            return call.input_ids == token_id
        embedding = self.entry_module.get_input_embeddings()(torch.tensor(token_id, device=call.inputs_embeds.device))
        return (call.inputs_embeds == embedding).all(-1)

    def image_units(self, arguments: dict, features) -> list[UnitTokens]:
        """The tokens of each image: from pre-encoded features (their newline rows), else from the image sizes."""
        if features is not None:
            newline = self.entry_module.image_newline
            flags = [newline_rows(image, newline) for image in features.pooler_output]
        else:
            flags = self.image_newlines_from_sizes(arguments)
        return [UnitTokens(newline=flag, grid=grid_of(flag, self.side)) for flag in flags]

    def image_newlines_from_sizes(self, arguments: dict) -> list[torch.Tensor]:
        raise NotImplementedError

    def visual_mask(self, call: EntryCall) -> torch.Tensor:
        if isinstance(call, AnyresCall) and call.visual is not None:
            return call.visual
        return super().visual_mask(call)

    def image_layout(self, call: EntryCall, visual: torch.Tensor) -> ImageLayout:
        if isinstance(call, AnyresCall) and call.unit is not None:
            return layout_of_units(call, visual)
        return super().image_layout(call, visual)


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
