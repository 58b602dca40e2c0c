"""Mistral 3 (`Mistral3ForConditionalGeneration`): a Pixtral vision tower that takes each image at its own size,
and a projector that merges spatial_merge_size x spatial_merge_size patches, in front of a Mistral (or
Ministral 3) decoder.

- An image of H x W pixels becomes a grid of (H // (patch_size * spatial_merge_size)) rows by
  (W // (patch_size * spatial_merge_size)) columns of `[IMG]` tokens (row-major), read from the call's
  `image_sizes`. The processor ends every row with `[IMG_BREAK]` and the last one with `[IMG_END]`.
- Visual tokens are the `[IMG]` placeholders (`image_token_id`) only. `[IMG_BREAK]` and `[IMG_END]` receive
  no image features (the model gives them their text embeddings), so they are text: never removed, and not
  counted by a token budget. They keep their positions, so the rows of a pruned image stay delimited.
- Images of different sizes in one batch work as the model takes them (pixel values padded to the largest,
  `image_sizes` giving each image's own size).
"""

import inspect

from torch import nn

from .base import EntryCall, bind_arguments
from .decoder_lm import LANGUAGE_MODELS, DecoderLanguageModelAdapter

# Ministral 3 checkpoints pair the Pixtral tower with a Ministral3 decoder (its attention also reads position_ids,
# which the runtime gathers with the kept tokens).
MISTRAL3_LANGUAGE_MODELS = (*LANGUAGE_MODELS, "Ministral3Model")


def _mistral3_classes() -> tuple[type, ...]:
    import transformers

    names = ["Mistral3ForConditionalGeneration", "Mistral3Model"]
    return tuple(getattr(transformers, name) for name in names if hasattr(transformers, name))


class Mistral3Adapter(DecoderLanguageModelAdapter):
    family = "mistral3"
    classes = "Mistral3ForConditionalGeneration"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, _mistral3_classes())

    def __init__(self, model: nn.Module):
        self.model = model
        self.entry_module = model.model if hasattr(model, "lm_head") else model
        language_model = getattr(self.entry_module, "language_model", None)
        self.attach_language_model(language_model, MISTRAL3_LANGUAGE_MODELS)
        config = self.entry_module.config
        self.image_token_id = int(config.image_token_id)
        self.pixels_per_token = int(config.vision_config.patch_size) * int(config.spatial_merge_size)
        self._entry_signature = inspect.signature(self.entry_module.forward)
        self.check_attention()

    def read_entry_call(self, args: tuple, kwargs: dict) -> EntryCall:
        arguments = bind_arguments(self._entry_signature, args, kwargs)
        encoded = (arguments.get("mm_encoder_outputs") or {}).get("image")
        has_images = arguments.get("pixel_values") is not None or encoded is not None
        image_inputs = {"image_sizes": arguments.get("image_sizes"), "encoded": encoded}
        return EntryCall(
            input_ids=arguments.get("input_ids"),
            inputs_embeds=arguments.get("inputs_embeds"),
            attention_mask=arguments.get("attention_mask"),
            image_inputs=image_inputs if has_images else None,
            cache=arguments.get("cache", arguments.get("past_key_values")),
        )

    def image_sizes(self, call: EntryCall) -> list[tuple[int, int, int]]:
        """(tokens, rows, cols) of each image, from its size in pixels; pre-encoded features without
        `image_sizes` give each image's token count on an unknown grid."""
        sizes = call.image_inputs["image_sizes"]
        if sizes is None:
            encoded = call.image_inputs["encoded"]
            features = getattr(encoded, "pooler_output", None) if encoded is not None else None
            if features is None:
                raise ValueError("Mistral 3 images without image_sizes: pass image_sizes (as the processor does)")
            return [(len(image), 0, 0) for image in features]
        result = []
        for height, width in sizes.tolist() if hasattr(sizes, "tolist") else sizes:
            rows, cols = int(height) // self.pixels_per_token, int(width) // self.pixels_per_token
            result.append((rows * cols, rows, cols))
        return result
