"""Idefics3 and SmolVLM: a SigLIP-style vision tower and a pixel-shuffle connector in front of a decoder language
model (Llama in the released checkpoints).

- The processor splits an image into rows x cols tiles plus a downscaled global view; each of these sub-images
  becomes `image_seq_len` image tokens on a square grid (side = image_size / patch_size / scale_factor,
  row-major), written `<fake_token_around_image><row_r_col_c><image>...` for a tile and
  `<fake_token_around_image><global-img><image>...<fake_token_around_image>` for the global view, which always
  comes last. An image too small to split is its global view alone; a video frame is one global view.
- Visual tokens are the `image_token_id` placeholders only; the fake, row/column and global tags are text and
  are never removed.
- A token budget counts an image: all its sub-images together. The model's config does not know the tag ids,
  so the images are read from the prompt's structure: the sub-image that ends an image is preceded by the same
  tag as the sample's last sub-image (the global-view tag). In a prompt written without the processor's tags the
  same rule applies to whatever token precedes each sub-image; the grouping only decides how a budget is
  shared, never what the model computes.
"""

import inspect

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .base import EntryCall
from .decoder_lm import DecoderLanguageModelAdapter
from .llava import read_llava_call


def _idefics3_classes() -> tuple[type, ...]:
    import transformers

    names = ["Idefics3ForConditionalGeneration", "Idefics3Model", "SmolVLMForConditionalGeneration", "SmolVLMModel"]
    return tuple(getattr(transformers, name) for name in names if hasattr(transformers, name))


class Idefics3Adapter(DecoderLanguageModelAdapter):
    family = "idefics3"
    classes = "Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, _idefics3_classes())

    def __init__(self, model: nn.Module):
        self.model = model
        self.entry_module = model.model if hasattr(model, "lm_head") else model
        self.attach_language_model(getattr(self.entry_module, "text_model", None))
        config = self.entry_module.config
        self.image_token_id = int(config.image_token_id)
        vision = config.vision_config
        side = int(vision.image_size) // int(vision.patch_size) // int(config.scale_factor)
        self.sub_image_grid = (side, side)
        self.sub_image_tokens = int(getattr(self.entry_module, "image_seq_len", side * side))
        self._entry_signature = inspect.signature(self.entry_module.forward)
        self.check_attention()

    def read_entry_call(self, args: tuple, kwargs: dict) -> EntryCall:
        return read_llava_call(self._entry_signature, args, kwargs)

    def vision_attention_module(self) -> nn.Module:
        raise UnsupportedModelError(
            "Idefics3 / SmolVLM: the connector pixel-shuffles scale_factor x scale_factor patches into each image "
            "token; methods that rank image tokens by the vision tower's attention are not supported"
        )

    def image_sizes(self, call: EntryCall) -> list[tuple[int, int, int]]:
        """One entry per sub-image (every one image_seq_len tokens on the same grid)."""
        rows, cols = self.sub_image_grid
        return [(self.sub_image_tokens, rows, cols)] * sum(len(ends) for ends in self._sub_image_ends(call))

    def sub_images(self, call: EntryCall) -> list[int]:
        counts = []
        for ends in self._sub_image_ends(call):
            count = 0
            for ends_image in ends:
                count += 1
                if ends_image:
                    counts.append(count)
                    count = 0
        return counts

    def images_of_call(self, call: EntryCall) -> list[torch.Tensor]:
        """Each image's pixels: its sub-images (the rows of pixel_values [B, N, C, H, W] that are not the all-zero
        padding the model skips), flattened and joined, so padding for batch mates never enters them."""
        pixels = call.image_inputs
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 5:
            return super().images_of_call(call)
        images = []
        for sample, ends in zip(pixels.unbind(0), self._sub_image_ends(call)):
            real = [sub_image for sub_image in sample.unbind(0) if bool(sub_image.ne(0).any())]
            if len(real) != len(ends):
                raise UnsupportedModelError(
                    f"{len(real)} sub-images in pixel_values for {len(ends)} sub-images of image tokens"
                )
            group = []
            for sub_image, ends_image in zip(real, ends):
                group.append(sub_image.reshape(-1))
                if ends_image:
                    images.append(torch.cat(group))
                    group = []
        return images

    def _sub_image_ends(self, call: EntryCall) -> list[list[bool]]:
        """Per sample, per sub-image: whether it is the last sub-image of its image."""
        visual = self.visual_mask(call)
        tokens = call.input_ids if call.input_ids is not None else call.inputs_embeds
        per_sample = []
        for row in range(visual.shape[0]):
            positions = visual[row].nonzero().flatten().tolist()
            if len(positions) % self.sub_image_tokens:
                raise ValueError(
                    f"sample {row} has {len(positions)} image tokens, not a whole number of sub-images of "
                    f"{self.sub_image_tokens} tokens (image_seq_len)"
                )
            starts = positions[:: self.sub_image_tokens]
            tags = [tokens[row, start - 1] if start > 0 else None for start in starts]
            last = tags[-1] if tags else None
            per_sample.append([_same_token(tag, last) for tag in tags[:-1]] + [True] * bool(tags))
        return per_sample


def _same_token(first: torch.Tensor | None, second: torch.Tensor | None) -> bool:
    """Whether two prompt positions hold the same token (ids, or embedding rows for inputs_embeds)."""
    if first is None or second is None:
        return False
    return bool(torch.equal(first, second))
