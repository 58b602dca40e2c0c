"""InternVL (transformers' `InternVLForConditionalGeneration`): an InternViT vision tower, pixel shuffle and an
MLP projector in front of a decoder language model (Qwen2 / Qwen3 / Llama in the released checkpoints).

- The processor splits an image into tiles plus a thumbnail (dynamic high resolution); each tile becomes
  `(image_size / patch_size * downsample_ratio)^2` image tokens on a square grid (row-major), and all the tiles
  of one image are a single run of `<IMG_CONTEXT>` tokens between `<img>` and `</img>`. A video is one such
  run per frame.
- Visual tokens are the `image_token_id` placeholders only; `<img>` / `</img>` are text and never removed.
- A token budget counts an image: one run of image tokens, all its tiles together; each tile is a sub-image
  with its own grid.
"""

import inspect

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .base import EntryCall
from .decoder_lm import DecoderLanguageModelAdapter
from .llava import read_llava_call


def _internvl_classes() -> tuple[type, ...]:
    import transformers

    names = ["InternVLForConditionalGeneration", "InternVLModel"]
    return tuple(getattr(transformers, name) for name in names if hasattr(transformers, name))


def _side(value) -> int:
    """The first entry of a (height, width) size, or the size itself."""
    return int(value[0]) if isinstance(value, (list, tuple)) else int(value)


class InternVLAdapter(DecoderLanguageModelAdapter):
    family = "internvl"
    classes = "InternVLForConditionalGeneration"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, _internvl_classes())

    def __init__(self, model: nn.Module):
        self.model = model
        self.entry_module = model.model if hasattr(model, "lm_head") else model
        self.attach_language_model(getattr(self.entry_module, "language_model", None))
        config = self.entry_module.config
        self.image_token_id = int(config.image_token_id)
        vision = config.vision_config
        side = int(_side(vision.image_size) // _side(vision.patch_size) * float(config.downsample_ratio))
        self.tile_grid = (side, side)
        self.tile_tokens = side * side
        self._entry_signature = inspect.signature(self.entry_module.forward)
        self.check_attention()

    def read_entry_call(self, args: tuple, kwargs: dict) -> EntryCall:
        return read_llava_call(self._entry_signature, args, kwargs)

    def vision_attention_module(self) -> nn.Module:
        raise UnsupportedModelError(
            "InternVL: pixel shuffle merges several patches of a tile into each image token; methods that rank "
            "image tokens by the vision tower's attention are not supported"
        )

    def image_sizes(self, call: EntryCall) -> list[tuple[int, int, int]]:
        """One entry per tile (all tiles share one grid)."""
        rows, cols = self.tile_grid
        return [(self.tile_tokens, rows, cols)] * sum(self.sub_images(call))

    def sub_images(self, call: EntryCall) -> list[int]:
        """Tiles per image: each run of image tokens is one image."""
        visual = self.visual_mask(call)
        run_starts = visual & ~torch.nn.functional.pad(visual[:, :-1], (1, 0), value=False)
        run_ends = visual & ~torch.nn.functional.pad(visual[:, 1:], (0, 1), value=False)
        # nonzero() lists both sample by sample, left to right: the k-th start and the k-th end bound one run
        lengths = (run_ends.nonzero()[:, 1] - run_starts.nonzero()[:, 1] + 1).tolist()
        for length in lengths:
            if length % self.tile_tokens:
                raise ValueError(
                    f"a run of {length} image tokens is not a whole number of tiles of {self.tile_tokens} tokens "
                    "(image_seq_length)"
                )
        return [length // self.tile_tokens for length in lengths]

    def images_of_call(self, call: EntryCall) -> list[torch.Tensor]:
        """Each image's pixels: its tiles (consecutive rows of pixel_values [tiles, C, H, W]), flattened and
        joined."""
        pixels = call.image_inputs
        if not isinstance(pixels, torch.Tensor):
            return super().images_of_call(call)
        tiles_per_image = self.sub_images(call)
        if sum(tiles_per_image) != pixels.shape[0]:
            raise UnsupportedModelError(
                f"{pixels.shape[0]} tiles in pixel_values for {sum(tiles_per_image)} tiles of image tokens"
            )
        return [tiles.reshape(-1) for tiles in pixels.split(tiles_per_image)]
