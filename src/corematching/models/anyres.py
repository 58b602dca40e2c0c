"""The token layout of LLaVA-NeXT and LLaVA-OneVision ("anyres"): each image is a base view (a side x side grid)
followed by its high-resolution tiles, unpadded to the image's aspect ratio, with an `image_newline` token at
the end of every row; an image too small for tiles is its base view plus one newline token. A OneVision video is
its frames, each pooled to a grid, then one newline token. Every one of these tokens is an image (or video)
placeholder in input_ids; the newline tokens carry the learned `image_newline` vector, not image content.

Newline tokens are layout markers: they are never removed, do not count in a budget and are not scored (the
runtime sees them as text). The visual tokens of one image or video are one budget unit.

Where the newline tokens are is read from the image features when the call brings them pre-encoded
(`mm_encoder_outputs`, as generate() passes them: the rows equal to `image_newline`), and otherwise from the
image sizes through the model's own packing function, run on one-channel stand-in features.
"""

import inspect
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .base import EntryCall, ImageLayout, bind_arguments
from .decoder_lm import DecoderLanguageModelAdapter
from .llava import LLAVA_LANGUAGE_MODELS, image_token_id_of, read_llava_call


@dataclass
class AnyresCall(EntryCall):
    """An entry call with its visual layout: visual placeholder tokens without the newline tokens, and per token
    the batch-wide image / video it belongs to."""

    visual: torch.Tensor | None = None  # [B, T] bool: visual tokens that are not newline tokens
    unit: torch.Tensor | None = None  # [B, T] long: batch-wide id of the image or video (images first), -1 else
    unit_grids: list[tuple[int, int]] | None = None  # per unit id: (grid rows, grid cols), (0, 0) when not one grid


@dataclass
class UnitTokens:
    """The placeholder tokens of one image or video, in order: which are newline tokens, and its grid."""

    newline: torch.Tensor  # [n] bool
    grid: tuple[int, int]  # (rows, cols) of its visual tokens when they form one grid, else (0, 0)


def newline_rows(features: torch.Tensor, image_newline: torch.Tensor) -> torch.Tensor:
    """[n] bool: the rows of features [n, H] that are the newline vector."""
    return (features == image_newline.to(features.device, features.dtype)).all(-1)


def grid_of(newline: torch.Tensor, side: int) -> tuple[int, int]:
    """An image that is only its base view (side x side tokens and one newline) has that grid; an image with
    tiles has two (the base view and the tiles), so none."""
    return (side, side) if int((~newline).sum()) == side * side else (0, 0)


def images_from_sizes(entry_module, image_sizes, patches: list[int], side: int, **pack_options) -> list[torch.Tensor]:
    """Newline flags of each image from its size, by the model's own `pack_image_features` run on one-channel
    stand-in features (0 for image content, 1 for the newline vector)."""
    if not patches:
        return []
    stand_in = [torch.zeros(count, side * side, 1) for count in patches]
    packed, _ = entry_module.pack_image_features(
        stand_in, image_sizes, image_newline=torch.ones(1), **pack_options
    )
    return [features[:, 0] == 1 for features in packed]


def pooled_side(side: int) -> int:
    """Tokens per side of a OneVision video frame: the frame's grid pooled 2 x 2 (rounded up)."""
    return math.ceil(side / 2)


def place_units(call: EntryCall, placeholders: list[torch.Tensor], units: list[list[UnitTokens]]) -> AnyresCall:
    """The call with its layout, from the placeholder mask [B, T] of each stream (images, videos) and the tokens
    of each stream's units in order. The features fill a stream's placeholders in row-major order over the batch,
    as the model's masked_scatter does. When counts disagree the layout is left out (the model raises its own
    error about the mismatch)."""
    reference = placeholders[0]
    visual = torch.zeros_like(reference)
    unit = torch.full(reference.shape, -1, dtype=torch.long, device=reference.device)
    grids: list[tuple[int, int]] = []
    for mask, stream in zip(placeholders, units):
        if not stream:
            continue
        newline = torch.cat([tokens.newline for tokens in stream]).to(reference.device)
        lengths = torch.tensor([len(tokens.newline) for tokens in stream], device=reference.device)
        if int(mask.sum()) != newline.numel():
            return AnyresCall(**vars(call))
        ids = torch.repeat_interleave(torch.arange(len(grids), len(grids) + len(stream), device=reference.device),
                                      lengths)
        unit[mask] = torch.where(newline, -1, ids)
        visual[mask] = ~newline
        grids += [tokens.grid for tokens in stream]
    return AnyresCall(**vars(call), visual=visual, unit=unit, unit_grids=grids)


def layout_of_units(call: AnyresCall, visual: torch.Tensor) -> ImageLayout:
    """ImageLayout of visual [B, T] from the call's units: image_index counts a sample's units in order of
    appearance, image_ordinal a token's place inside its unit."""
    unit = torch.where(visual, call.unit, -1)
    batch, length = unit.shape
    count = len(call.unit_grids)
    device = unit.device
    flat = unit.view(-1)
    inside = flat >= 0
    one_hot = torch.nn.functional.one_hot(flat.clamp(min=0), max(count, 1)) * inside.unsqueeze(1)  # [B*T, U]
    ordinal = (one_hot.cumsum(0) - 1).gather(1, flat.clamp(min=0).unsqueeze(1)).squeeze(1)
    position = torch.arange(batch * length, device=device)
    first = torch.full((max(count, 1),), batch * length, device=device)
    first = first.scatter_reduce(0, flat.clamp(min=0), torch.where(inside, position, batch * length), "amin")
    sample = first // length  # [U] sample of each unit
    earlier = (sample.unsqueeze(0) == sample.unsqueeze(1)) & (first.unsqueeze(0) < first.unsqueeze(1))  # [U, U']
    index_in_sample = earlier.sum(1)  # [U]: units of the same sample that start earlier
    rows = torch.tensor([grid[0] for grid in call.unit_grids] or [0], device=device)
    cols = torch.tensor([grid[1] for grid in call.unit_grids] or [0], device=device)
    safe = flat.clamp(min=0)
    outside = torch.full_like(flat, -1)
    return ImageLayout(
        image_index=torch.where(inside, index_in_sample[safe], outside).view(batch, length),
        image_ordinal=torch.where(inside, ordinal, outside).view(batch, length),
        grid_rows=torch.where(inside, rows[safe], 0).view(batch, length),
        grid_cols=torch.where(inside, cols[safe], 0).view(batch, length),
    )


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
        elif arguments.get("image_sizes") is None:
            raise ValueError(
                f"{type(self.model).__name__}: pixel_values without image_sizes; pass the image_sizes the processor "
                "returns (each image's token count depends on its size)"
            )
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

    def vision_attention_module(self) -> nn.Module:
        raise UnsupportedModelError(
            f"{type(self.model).__name__}: the features of an image's tiles are resized when it has many of them "
            "(anyres_max), so a visual token is not one tower patch; methods that rank image tokens by the "
            "vision tower's attention are not supported"
        )

    def vision_tower_module(self) -> nn.Module:
        raise UnsupportedModelError(
            f"{type(self.model).__name__}: the vision tower runs on the tiles of every image of a call at once, so "
            "its input cannot be split into images (image fingerprints are not taken: random draws depend on the "
            "token positions only)"
        )

    def images_of_call(self, call: EntryCall) -> list[torch.Tensor]:
        raise UnsupportedModelError(
            f"{type(self.model).__name__}: pixel values are padded to the batch's most tiles, so a row is not one "
            "image on its own (image fingerprints are not taken: random draws depend on the token positions only)"
        )
