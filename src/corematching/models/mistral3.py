"""Mistral 3 (`Mistral3ForConditionalGeneration`): a Pixtral vision tower that takes each image at its own size,
and a projector that merges spatial_merge_size x spatial_merge_size patches, in front of a Mistral (or
Ministral 3) decoder.

- An image of H x W pixels becomes a grid of (H // (patch_size * spatial_merge_size)) rows by
  (W // (patch_size * spatial_merge_size)) columns of `[IMG]` tokens (row-major), read from the call's
  `image_sizes`. The processor ends every row with `[IMG_BREAK]` and the last one with `[IMG_END]`; when
  `generate` has encoded the images before the call (it keeps `image_sizes` to itself), each image's token count
  comes from its features and its grid from those rows.
- Visual tokens are the `[IMG]` placeholders (`image_token_id`) only. `[IMG_BREAK]` and `[IMG_END]` receive
  no image features (the model gives them their text embeddings), so they are text: never removed, and not
  counted by a token budget. They keep their positions, so the rows of a pruned image stay delimited.
- Images of different sizes in one batch work as the model takes them (pixel values padded to the largest,
  `image_sizes` giving each image's own size). Methods that fingerprint an image's pixels see each image
  cropped to its own size, so padding for batch mates never changes them.
"""

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .base import EntryCall, bind_arguments, entry_call_from
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

    def read_entry_call(self, args: tuple, kwargs: dict) -> "Mistral3Call":
        arguments = bind_arguments(self._entry_signature, args, kwargs)
        image_inputs = arguments.get("pixel_values")
        if image_inputs is None:
            image_inputs = (arguments.get("mm_encoder_outputs") or {}).get("image")
        return entry_call_from(arguments, image_inputs, Mistral3Call, image_sizes=arguments.get("image_sizes"))

    def vision_attention_module(self) -> nn.Module:
        raise UnsupportedModelError(
            "Mistral 3: the patch merger joins spatial_merge_size x spatial_merge_size patches into each image "
            "token; methods that rank image tokens by the vision tower's attention are not supported"
        )

    def image_sizes(self, call: "Mistral3Call") -> list[tuple[int, int, int]]:
        """(tokens, rows, cols) of each image: from its size in pixels when the call has `image_sizes`; for images
        encoded before the call (generate encodes them first and keeps image_sizes to itself), each image's token
        count from its features and its grid from the prompt (one run of [IMG] tokens per row; unknown, 0 x 0,
        where the runs do not form one)."""
        if call.image_sizes is not None:
            result = []
            for height, width in _pairs(call.image_sizes):
                rows, cols = height // self.pixels_per_token, width // self.pixels_per_token
                result.append((rows * cols, rows, cols))
            return result
        features = getattr(call.image_inputs, "pooler_output", None)
        if features is None:
            raise ValueError("Mistral 3 pixel values without image_sizes: pass image_sizes (as the processor does)")
        return _grids_from_rows([len(image) for image in features], self.visual_mask(call))

    def images_of_call(self, call: "Mistral3Call") -> list[torch.Tensor]:
        """Each image's pixels at its own size (the call's pixel values are padded to the largest image)."""
        if not isinstance(call.image_inputs, torch.Tensor) or call.image_sizes is None:
            return super().images_of_call(call)
        return _crop(call.image_inputs, call.image_sizes)

    def tower_images(self, pixels: torch.Tensor, tower_kwargs: dict) -> list[torch.Tensor]:
        sizes = tower_kwargs.get("image_sizes")
        return super().tower_images(pixels, tower_kwargs) if sizes is None else _crop(pixels, sizes)


@dataclass
class Mistral3Call(EntryCall):
    """An entry call with the pixel size of each of its images (the model's `image_sizes` argument)."""

    image_sizes: object = None  # [N images, 2] (height, width) in pixels, or None


def _pairs(sizes) -> list[tuple[int, int]]:
    rows = sizes.tolist() if hasattr(sizes, "tolist") else sizes
    return [(int(height), int(width)) for height, width in rows]


def _crop(pixels: torch.Tensor, sizes) -> list[torch.Tensor]:
    """pixels [N, C, H, W] padded to the largest image -> each image at its (height, width)."""
    return [image[:, :height, :width] for image, (height, width) in zip(pixels.unbind(0), _pairs(sizes))]


def _grids_from_rows(counts: list[int], visual: torch.Tensor) -> list[tuple[int, int, int]]:
    """(tokens, rows, cols) per image given its token count: the k-th image of the batch covers the next counts[k]
    visual tokens (sample by sample); its rows are its runs of consecutive visual tokens when they all have the
    same length (the processor ends each row with [IMG_BREAK] or [IMG_END]), else its grid is unknown (0 x 0)."""
    positions = [(row, column) for row, column in visual.nonzero().tolist()]
    result, start = [], 0
    for count in counts:
        image = positions[start : start + count]
        start += count
        run_starts = [k for k in range(len(image)) if k == 0 or image[k] != (image[k - 1][0], image[k - 1][1] + 1)]
        lengths = [end - begin for begin, end in zip(run_starts, [*run_starts[1:], len(image)])]
        if lengths and len(set(lengths)) == 1:
            result.append((count, len(lengths), lengths[0]))
        else:
            result.append((count, 0, 0))
    return result
