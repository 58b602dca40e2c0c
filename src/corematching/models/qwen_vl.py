"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: a ViT with 2x2 spatial merging in front of a Qwen2/Qwen3 language model
with multimodal RoPE (M-RoPE).

- Visual tokens are the `image_token_id` and `video_token_id` placeholders. Each image or video is one run of
  them (the processor wraps each in vision_start / vision_end), with its own grid from `image_grid_thw` /
  `video_grid_thw` after the spatial merge: t x (h / m) x (w / m) tokens; a video's frames are stacked into one
  grid of t * h / m rows, and the budget counts the whole video.
- Positions: the model computes the 3-D position ids (temporal, height, width) of the whole prompt and keeps
  `rope_deltas` on the model; decoding continues from the cache length of layer 0 (which holds every token) plus
  those deltas, so generated tokens get exactly their dense positions. The deltas are the conversation's, not the
  model's: under a session they are saved on the cache after each call and put back before a continuation
  (runtime/conversation.py), also before generate() reads them to prepare its position ids. The decoder layers
  receive the position embeddings already composed per token ([B, T, D]); the kept tokens' rows are gathered from them.
- Qwen3-VL adds DeepStack visual features after each of its first decoder layers at the visual positions (one
  level per layer); after the prune layer they are added to the kept visual tokens only (the removed ones are no
  longer there), so any prune layer works, the default one (1) included, as in the oracle, where a removed
  token's features no longer reach anything.
"""

import inspect

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .base import EntryCall, FFNParts, ModelAdapter, bind_arguments, entry_call_from, gated_mlp_parts


def _qwen_vl_classes() -> tuple[type, ...]:
    import transformers

    names = [
        "Qwen2VLForConditionalGeneration",
        "Qwen2VLModel",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen2_5_VLModel",
        "Qwen3VLForConditionalGeneration",
        "Qwen3VLModel",
    ]
    return tuple(getattr(transformers, name) for name in names if hasattr(transformers, name))


class QwenVLAdapter(ModelAdapter):
    family = "qwen-vl"
    classes = (
        "Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration"
    )

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, _qwen_vl_classes())

    def __init__(self, model: nn.Module):
        self.model = model
        self.entry_module = model.model if hasattr(model, "lm_head") else model
        self.language_model = self.entry_module.language_model
        self.decoder_layers = list(self.language_model.layers)
        for index in range(len(self.decoder_layers)):
            self.ffn(index)  # raises when a layer lacks the gated MLP parts
        config = self.entry_module.config
        self.image_token_id = int(config.image_token_id)
        self.video_token_id = int(config.video_token_id)
        self.spatial_merge = int(config.vision_config.spatial_merge_size)
        # Qwen3-VL: visual features added into the first layers (one per DeepStack level)
        self.deepstack_layers = len(getattr(config.vision_config, "deepstack_visual_indexes", None) or [])
        self._entry_signature = inspect.signature(self.entry_module.forward)
        self.check_attention()

    def between_layer_wrappers(self, kept_tokens) -> list[tuple[object, str, object]]:
        """Qwen3-VL adds DeepStack level l's features to the visual tokens after decoder layer l; after the prune
        layer only the kept visual tokens are there to receive theirs."""
        text_model = self.language_model
        if not self.deepstack_layers or not hasattr(text_model, "_deepstack_process"):
            return []
        original = text_model._deepstack_process

        def deepstack_on_held_tokens(hidden_states, visual_pos_masks, visual_embeds):
            held = kept_tokens()
            if held is not None and visual_pos_masks is not None:
                visual_pos_masks, visual_embeds = _held_visual_features(held, visual_pos_masks, visual_embeds)
            return original(hidden_states, visual_pos_masks, visual_embeds)

        return [(text_model, "_deepstack_process", deepstack_on_held_tokens)]

    def conversation_state(self) -> dict[str, torch.Tensor | None]:
        return {"rope_deltas": self.entry_module.rope_deltas}  # [B, 1] M-RoPE position minus token index

    def restore_conversation_state(self, values: dict[str, torch.Tensor | None]) -> None:
        self.entry_module.rope_deltas = values["rope_deltas"]

    def generation_position_readers(self) -> list[tuple[object, str]]:
        # generate() computes the position ids of a whole call from rope_deltas before the first forward
        if self.model is self.entry_module:
            return []
        return [(self.model, "_prepare_position_ids_for_generation")]

    def ffn(self, layer: int) -> FFNParts:
        return gated_mlp_parts(self.decoder_layers[layer], layer)

    def visual_token_ids(self) -> tuple[int, ...]:
        return (self.image_token_id, self.video_token_id)

    def read_entry_call(self, args: tuple, kwargs: dict) -> EntryCall:
        arguments = bind_arguments(self._entry_signature, args, kwargs)
        encoded = arguments.get("mm_encoder_outputs") or {}
        kinds = {
            self.image_token_id: (arguments.get("pixel_values"), encoded.get("image"), arguments.get("image_grid_thw")),
            self.video_token_id: (
                arguments.get("pixel_values_videos"),
                encoded.get("video"),
                arguments.get("video_grid_thw"),
            ),
        }
        has_images = any(pixels is not None or features is not None for pixels, features, _ in kinds.values())
        image_inputs = None
        if has_images:
            sizes = {kind: _sizes_of(features, grid, self.spatial_merge) for kind, (_, features, grid) in kinds.items()}
            image_inputs = {"sizes": sizes, "position_ids": arguments.get("position_ids")}
        return entry_call_from(arguments, image_inputs)

    def image_sizes(self, call: EntryCall) -> list[tuple[int, int, int]]:
        """(tokens, rows, cols) of each image and video, in order of appearance: runs of visual tokens are
        matched in order with the image sizes (image runs) and the video sizes (video runs). Where the grids were
        not passed (generate encodes the images beforehand), a run's columns are read from its M-RoPE width
        positions."""
        sizes_of_kind = call.image_inputs["sizes"]
        if call.input_ids is None:
            if sizes_of_kind[self.video_token_id]:
                raise UnsupportedModelError("inputs_embeds with videos: pass input_ids to tell images from videos")
            return sizes_of_kind[self.image_token_id]
        next_of_kind = {kind: iter(sizes) for kind, sizes in sizes_of_kind.items()}
        position_ids = call.image_inputs["position_ids"]
        sizes = []
        for row, tokens in enumerate(call.input_ids.tolist()):
            previous = None
            for start, token in enumerate(tokens):
                if token in next_of_kind and token != previous:  # the first token of a run
                    size = next(next_of_kind[token], None)
                    if size is None:
                        raise ValueError("more runs of image/video tokens than images/videos were given")
                    if size[1] == 0 and position_ids is not None:
                        size = _size_from_positions(position_ids, row, start, size[0])
                    sizes.append(size)
                previous = token
        return sizes


def _held_visual_features(held: tuple, visual_pos_masks: torch.Tensor, visual_embeds: torch.Tensor):
    """The DeepStack inputs restricted to the held tokens: visual_pos_masks [B, T] (visual tokens of the call) and
    visual_embeds [N, H] (one row per visual token, row-major) -> the held visual slots [B, L] and their rows."""
    index, valid = held
    visual = visual_pos_masks.to(index.device)
    row_of_token = visual.reshape(-1).long().cumsum(0).view_as(visual) - 1  # [B, T] its row of visual_embeds
    held_visual = visual.gather(1, index) & valid  # [B, L]
    rows = row_of_token.gather(1, index)[held_visual]  # row-major, as the model indexes hidden_states[mask]
    return held_visual, visual_embeds[rows.to(visual_embeds.device)]


def _sizes_of(features, grid_thw: torch.Tensor | None, merge: int) -> list[tuple[int, int, int]]:
    """(tokens, rows, cols) of each image/video: from the [N, 3] (t, h, w) patch grids when given, else the
    token counts of the encoded features with the grid unknown (0 x 0)."""
    if grid_thw is not None:
        return _merged_grids(grid_thw, merge)
    if features is None:
        return []
    return [(int(part.shape[0]), 0, 0) for part in features.pooler_output]


def _size_from_positions(position_ids: torch.Tensor, row: int, start: int, count: int) -> tuple[int, int, int]:
    """An image's grid from its M-RoPE positions ([3 or 4, B, T]: the last two rows are height and width)."""
    width_positions = position_ids[-1, row, start : start + count]
    cols = int(width_positions.max() - width_positions.min()) + 1
    return (count, count // cols, cols) if count % cols == 0 else (count, 0, 0)


def _merged_grids(grid_thw: torch.Tensor | None, merge: int) -> list[tuple[int, int, int]]:
    """[(tokens, rows, cols)] per image/video from a [N, 3] (t, h, w) patch grid, after the m x m merge."""
    if grid_thw is None:
        return []
    sizes = []
    for t, h, w in grid_thw.tolist():
        rows, cols = h // merge, w // merge
        sizes.append((t * rows * cols, t * rows, cols))
    return sizes
