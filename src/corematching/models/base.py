"""The adapter interface: where a model family keeps what the runtime needs.

An adapter knows model classes, never methods. It tells the runtime
  - which module receives the token ids and images of a call (the entry), and how to read that call;
  - the language model, whose input embeddings carry the image features;
  - the decoder layers of the language model, how to read and rewrite their inputs, and how to gather
    position ids and position embeddings for a subset of tokens;
  - each layer's FFN parts (gate/up/down and activation function);
  - the visual token id and the image grid.
A new family (Qwen2-VL with M-RoPE, Gemma with GeGLU, ...) is one subclass in one file, registered in
models/__init__.py.
"""

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .attention_scores import attention_received, keys_over_heads, last_token_attention


@dataclass(frozen=True)
class FFNParts:
    """One FFN: a(x) = act(gate(x)) * up(x) (gated) or act(up(x)); output down(a)."""

    module: nn.Module
    up: nn.Linear
    down: nn.Linear
    act: Callable[[torch.Tensor], torch.Tensor]
    gate: nn.Linear | None = None


@dataclass
class EntryCall:
    """One call of the entry module, as read from its arguments."""

    input_ids: torch.Tensor | None  # [B, T]
    inputs_embeds: torch.Tensor | None  # [B, T, H]
    attention_mask: torch.Tensor | None  # [B, past + T] 2-D padding mask, or None
    image_inputs: object  # the pixel values or pre-encoded image features of the call, None without images
    cache: object  # the KV cache passed in, or None

    @property
    def batch_size(self) -> int:
        tokens = self.input_ids if self.input_ids is not None else self.inputs_embeds
        return tokens.shape[0]

    @property
    def length(self) -> int:
        tokens = self.input_ids if self.input_ids is not None else self.inputs_embeds
        return tokens.shape[1]

    @property
    def device(self) -> torch.device:
        tokens = self.input_ids if self.input_ids is not None else self.inputs_embeds
        return tokens.device


@dataclass(frozen=True)
class AttentionRule:
    """A decoder layer's attention pattern, in full-sequence indices: causal, within `sliding_window` tokens when
    set (a query at i sees keys j with i - j < window), and, with `bidirectional_images`, every token of its own
    image both ways."""

    sliding_window: int | None = None
    bidirectional_images: bool = False


@dataclass
class ImageLayout:
    """Per token of a call [B, T] (long): the image it belongs to within its sample (-1 outside images), its
    position inside that image (row-major over the image's grid), and that image's grid rows and columns (0
    where unknown).

    An image may be made of several sub-images, each its own grid (Idefics3 and SmolVLM split an image into tiles
    plus a downscaled global view; InternVL into tiles plus a thumbnail). Then `image_index` and `image_ordinal`
    count the whole image (all its sub-images, in token order: the unit a token budget applies to), the grid is
    the token's sub-image's, and `sub_image_index` / `sub_image_ordinal` say which sub-image of its image the
    token is in (0, 1, ...) and where inside that sub-image's grid (row-major). For an image of one grid,
    `sub_image_index` is 0 and `sub_image_ordinal` equals `image_ordinal`. Both are -1 outside images."""

    image_index: torch.Tensor
    image_ordinal: torch.Tensor
    grid_rows: torch.Tensor
    grid_cols: torch.Tensor
    sub_image_index: torch.Tensor | None = None
    sub_image_ordinal: torch.Tensor | None = None


def fixed_size_images(visual: torch.Tensor, per_image: int | None, grid: tuple[int, int] | None) -> ImageLayout:
    """Every image has `per_image` tokens (None: one image per sample) on the same grid."""
    ordinal = visual.long().cumsum(1) - 1  # [B, T] index among the sample's visual tokens
    image_index = ordinal // per_image if per_image else torch.zeros_like(ordinal)
    image_ordinal = ordinal % per_image if per_image else ordinal
    outside = torch.full_like(ordinal, -1)
    rows, cols = grid if grid is not None else (0, 0)
    image_ordinal = torch.where(visual, image_ordinal, outside)
    return ImageLayout(
        image_index=torch.where(visual, image_index, outside),
        image_ordinal=image_ordinal,
        grid_rows=torch.where(visual, rows, 0),
        grid_cols=torch.where(visual, cols, 0),
        sub_image_index=torch.where(visual, 0, outside),
        sub_image_ordinal=image_ordinal,
    )


def images_of_sizes(
    visual: torch.Tensor, sizes: list[tuple[int, int, int]], sub_images: list[int] | None = None
) -> ImageLayout:
    """Images of different sizes: the k-th (sub-)image of the batch (sample by sample, in order) covers the next
    sizes[k][0] visual tokens, on a sizes[k][1] x sizes[k][2] grid. With `sub_images`, the entries of `sizes`
    are sub-images and the j-th image is the next sub_images[j] of them (an image never spans two samples);
    without it, every entry is an image of its own."""
    device = visual.device
    if sub_images is None:
        sub_images = [1] * len(sizes)
    if sum(sub_images) != len(sizes) or any(count < 1 for count in sub_images):
        raise ValueError(f"sub-images per image {sub_images} do not add up to the {len(sizes)} sub-images")
    if not sizes:  # no image: every token is outside
        sizes, sub_images = [(0, 0, 0)], [1]
    counts = torch.tensor([size[0] for size in sizes], device=device)
    starts = counts.cumsum(0) - counts  # [N] first batch-wide visual ordinal of each sub-image
    flat_ordinal = visual.reshape(-1).long().cumsum(0).view_as(visual) - 1  # batch-wide, row-major
    entry = torch.searchsorted(starts, flat_ordinal.clamp(min=0), right=True) - 1  # [B, T] batch-wide sub-image
    entry = entry.clamp(min=0)
    per_image = torch.tensor(sub_images, device=device)
    first_entry = per_image.cumsum(0) - per_image  # [M] first sub-image of each image
    image_of_entry = torch.repeat_interleave(torch.arange(len(sub_images), device=device), per_image)  # [N]
    image = image_of_entry[entry]  # [B, T] batch-wide image id
    first_image_of_sample = torch.where(visual, image, image.max() + 1).amin(1, keepdim=True)  # [B, 1]
    rows = torch.tensor([size[1] for size in sizes], device=device)
    cols = torch.tensor([size[2] for size in sizes], device=device)
    outside = torch.full_like(image, -1)
    return ImageLayout(
        image_index=torch.where(visual, image - first_image_of_sample, outside),
        image_ordinal=torch.where(visual, flat_ordinal - starts[first_entry[image]], outside),
        grid_rows=torch.where(visual, rows[entry], 0),
        grid_cols=torch.where(visual, cols[entry], 0),
        sub_image_index=torch.where(visual, entry - first_entry[image], outside),
        sub_image_ordinal=torch.where(visual, flat_ordinal - starts[entry], outside),
    )


def entry_call_from(arguments: dict, image_inputs: object, call_class: type = None, **extra) -> EntryCall:
    """An EntryCall (or a family's subclass of it, with its `extra` fields) from an entry module's bound
    arguments and the images the adapter found in them."""
    return (call_class or EntryCall)(
        input_ids=arguments.get("input_ids"),
        inputs_embeds=arguments.get("inputs_embeds"),
        attention_mask=arguments.get("attention_mask"),
        image_inputs=image_inputs,
        cache=arguments.get("cache", arguments.get("past_key_values")),
        **extra,
    )


@dataclass
class LayerInputs:
    """The inputs of one decoder layer call that token removal rewrites."""

    hidden_states: torch.Tensor  # [B, T, H]
    attention_mask: object  # 4-D mask or None
    position_ids: torch.Tensor | None
    position_embeddings: object  # e.g. (cos, sin)
    cache: object


class ModelAdapter:
    """Base adapter. Subclasses set the attributes in __init__ and may override the gather functions."""

    family: str = ""
    classes: str = ""  # the transformers classes the adapter takes, for messages and supported_models()
    supported_attention = ("sdpa", "eager")

    # Set by subclasses.
    model: nn.Module
    entry_module: nn.Module
    language_model: nn.Module
    decoder_layers: list[nn.Module]
    image_token_id: int
    image_grid: tuple[int, int] | None = None  # (rows, cols) of one image's tokens, when all images share it
    tokens_per_image: int | None = None
    position_token_dim: int = 1  # the token dim of position embeddings ([B, T, D]; 2 for M-RoPE's [3, B, T, D])

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Cheap check: whether this adapter is the one for the model's class."""
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)

    def attention_implementation(self) -> str:
        return self.language_model.config._attn_implementation

    def check_attention(self) -> None:
        implementation = self.attention_implementation()
        if implementation not in self.supported_attention:
            raise UnsupportedModelError(
                f"attention implementation {implementation!r} is not supported; load the model with "
                f"attn_implementation in {self.supported_attention}"
            )

    def ffn(self, layer: int) -> FFNParts:
        raise NotImplementedError

    def check_prune_layer(self, prune_layer: int | None) -> None:
        """Raise ValueError when tokens cannot be removed after `prune_layer` in this model."""

    # ------------------------------------------------------------------------------------------ entry calls

    def read_entry_call(self, args: tuple, kwargs: dict) -> EntryCall:
        raise NotImplementedError

    def visual_token_ids(self) -> tuple[int, ...]:
        """The placeholder ids whose positions receive image (or video) features."""
        return (self.image_token_id,)

    def visual_mask(self, call: EntryCall) -> torch.Tensor:
        """Bool [B, T]: the visual placeholder tokens of the call."""
        ids = self.visual_token_ids()
        if call.input_ids is not None:
            return torch.isin(call.input_ids, torch.tensor(ids, device=call.input_ids.device))
        embed = self.entry_module.get_input_embeddings()
        mask = torch.zeros(call.inputs_embeds.shape[:2], dtype=torch.bool, device=call.inputs_embeds.device)
        for token_id in ids:
            embedding = embed(torch.tensor(token_id, device=call.inputs_embeds.device))
            mask |= (call.inputs_embeds == embedding).all(-1)
        return mask

    def image_sizes(self, call: EntryCall) -> list[tuple[int, int, int]] | None:
        """(tokens, grid rows, grid cols) of every image of the call (of every sub-image, where images are split:
        see `sub_images`), in order of appearance (sample by sample), or None when every image has the model's
        fixed `tokens_per_image` and `image_grid`."""
        return None

    def sub_images(self, call: EntryCall) -> list[int] | None:
        """For models that split an image into sub-images (tiles, a global view), each its own entry of
        `image_sizes`: how many consecutive entries make up each image of the call, in the same order; None when
        every entry is an image of its own."""
        return None

    def image_layout(self, call: EntryCall, visual: torch.Tensor) -> "ImageLayout":
        """Which image each visual token of visual [B, T] belongs to, where inside it, and that image's grid."""
        sizes = self.image_sizes(call)
        if sizes is None:
            return fixed_size_images(visual, self.tokens_per_image, self.image_grid)
        return images_of_sizes(visual, sizes, self.sub_images(call))

    def attention_rule(self, layer: int, call: EntryCall | None = None) -> "AttentionRule":
        """How decoder layer `layer` masks attention in `call` (from the language model's config by default; a
        family whose rule depends on the call's inputs reads them from `call`)."""
        config = self.language_model.config
        layer_types = getattr(config, "layer_types", None)
        window = None
        if layer_types is not None and layer_types[layer] == "sliding_attention":
            window = getattr(config, "sliding_window", None)
        return AttentionRule(sliding_window=window, bidirectional_images=False)

    def output_cache(self, output) -> object:
        """The KV cache an entry call returned (it may have created it), or None."""
        if isinstance(output, tuple):  # return_dict=False: the cache is the element that is one
            from transformers.cache_utils import Cache

            return next((item for item in output if isinstance(item, Cache)), None)
        cache = getattr(output, "cache", None)
        return cache if cache is not None else getattr(output, "past_key_values", None)

    def top_module(self) -> nn.Module:
        """The module users call (it takes `labels`)."""
        return self.model

    # ------------------------------------------------------------------------------------------ conversation state
    # State the model keeps between the calls of one conversation, on the model rather than on the KV cache
    # (runtime/conversation.py saves it on the cache after each call and puts it back before a continuation).

    def conversation_state(self) -> dict[str, torch.Tensor | None] | None:
        """What the model holds now of the current conversation: {name: None or a tensor whose first dim is the
        batch}; None for a family that keeps nothing between calls."""
        return None

    def restore_conversation_state(self, values: dict[str, torch.Tensor | None]) -> None:
        """Put back into the model what conversation_state() returned."""

    def between_layer_wrappers(self, kept_tokens: Callable[[], tuple | None]) -> list[tuple[object, str, Callable]]:
        """(owner, method name, wrapper) for methods the language model calls between decoder layers that add
        per-token inputs over the full sequence (Qwen3-VL's DeepStack features); each wrapper applies them to the
        tokens the layers hold: kept_tokens() gives (index [B, L] of each held token in the call, valid [B, L]),
        or None while every token is held in place."""
        return []

    def generation_position_readers(self) -> list[tuple[object, str]]:
        """(owner, method name) of the methods generate() calls before its first forward, with (inputs_tensor,
        model_kwargs), that read the conversation state from the model."""
        return []

    # ------------------------------------------------------------------------------------------ method inputs
    # What a method may ask for beside the FFN activations (methods.base.METHOD_INPUTS). The defaults serve
    # Llama-like attention (q_proj / k_proj, 1-D RoPE from the attention module's own modeling file) and
    # LLaVA-style towers (`vision_tower`, `vision_feature_layer`); a family that differs overrides them, and one
    # that cannot provide an input raises UnsupportedModelError naming it.

    def attention_module(self, layer: int) -> nn.Module:
        """The self-attention module of decoder layer `layer` (its forward pre-hook sees the normalized input)."""
        return self.decoder_layers[layer].self_attn

    def last_token_attention(
        self, layer: int, hidden_states: torch.Tensor, position_embeddings, valid: torch.Tensor
    ) -> torch.Tensor:
        """[B, T]: the attention row of each sample's last valid token at decoder layer `layer`, averaged over
        heads, from the attention module's input hidden_states [B, T, H] and position_embeddings, as the model
        computes it (its RoPE, its causal and sliding-window rule)."""
        attention = self.attention_module(layer)
        modeling = sys.modules[type(attention).__module__]
        apply_rotary = getattr(modeling, "apply_rotary_pos_emb", None)
        if self.position_token_dim != 1 or apply_rotary is None or not hasattr(attention, "q_proj"):
            raise UnsupportedModelError(
                f"{self.family}: the last token's attention row is computed for 1-D RoPE attention with q_proj / "
                f"k_proj only, not for {type(attention).__name__}"
            )

        def rotate(states, cos, sin):
            return apply_rotary(states, states, cos, sin)[0]

        window = self.attention_rule(layer).sliding_window
        return last_token_attention(attention, hidden_states, position_embeddings, valid, rotate, window)

    def _vision_feature_layer(self) -> tuple[nn.Module, nn.Module]:
        """(the tower's vision model, the attention module of the encoder layer whose output is the features)."""
        config = self.entry_module.config
        tower = getattr(self.entry_module, "vision_tower", None)
        feature_layer = getattr(config, "vision_feature_layer", None)
        vision_model = getattr(tower, "vision_model", tower)
        layers = getattr(getattr(vision_model, "encoder", None), "layers", None)
        if layers is None or not isinstance(feature_layer, int) or feature_layer == 0:
            raise UnsupportedModelError(
                f"{self.family}: the vision attention needs a tower with encoder layers and one feature layer "
                f"(vision_feature_layer={feature_layer!r})"
            )
        # hidden_states[i] is the output of encoder layer i - 1 (hidden_states[0]: the embeddings)
        return vision_model, layers[feature_layer if feature_layer < 0 else feature_layer - 1].self_attn

    def vision_tower_module(self) -> nn.Module:
        """The vision tower: called with the pixel values first, its output object is what `generate` passes back
        in as pre-encoded image outputs."""
        tower = getattr(self.entry_module, "vision_tower", None)
        if tower is None:
            raise UnsupportedModelError(f"{self.family}: no vision_tower found")
        return tower

    def feature_tower_module(self) -> nn.Module:
        """The module whose output object carries what the tower hooks computed for a call's images (the vision
        tower; the same module as vision_tower_module unless a family splits images into tiles)."""
        return self.vision_tower_module()

    def feature_packing(self):
        """Where a family packs the tower's patch features into its visual tokens when they are not one token per
        patch in order (tiles, unpadding, newline tokens): (owner, method name, sources), where
        sources(method, args, kwargs) gives, for a call of that method, the flat index (tower row * patches +
        patch) of the patch each visual token holds, in order. None: one token per patch, in order."""
        return None

    def vision_attention_module(self) -> nn.Module:
        """The vision tower's attention module in the layer whose output becomes the image features."""
        return self._vision_feature_layer()[1]

    def vision_token_attention(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[N images, P]: the attention each image-feature token received in vision_attention_module (from the
        CLS token where the tower has one, else averaged over queries), from that module's input hidden_states;
        P is the number of visual tokens per image entering the language model."""
        vision_model, attention = self._vision_feature_layer()
        has_cls = getattr(getattr(vision_model, "embeddings", None), "class_embedding", None) is not None
        received = attention_received(attention, hidden_states, from_first_token=has_cls)
        if getattr(self.entry_module.config, "vision_feature_select_strategy", "full") == "default":
            received = received[:, 1:]  # the features drop the first (CLS) token
        return received

    def vision_token_keys(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[N images, P, d]: each image-feature token's key in vision_attention_module, averaged over heads, from
        that module's input hidden_states."""
        keys = keys_over_heads(self._vision_feature_layer()[1], hidden_states)
        if getattr(self.entry_module.config, "vision_feature_select_strategy", "full") == "default":
            keys = keys[:, 1:]
        return keys

    def images_of_call(self, call: EntryCall) -> list[torch.Tensor]:
        """The call's image inputs, one tensor per image in order (sample by sample): rows of the pixel values."""
        images = call.image_inputs
        if isinstance(images, torch.Tensor):
            return list(images.unbind(0))
        if isinstance(images, (list, tuple)) and all(isinstance(image, torch.Tensor) for image in images):
            return list(images)
        raise UnsupportedModelError(f"{self.family}: image inputs of type {type(images).__name__} cannot be split")

    def tower_images(self, pixels: torch.Tensor, tower_kwargs: dict) -> list[torch.Tensor]:
        """The images a call of vision_tower_module received, one tensor per image: rows of its pixel input by
        default. A tower that takes images padded to the batch's largest crops them here, so that an image's
        fingerprint never depends on its batch mates."""
        return list(pixels.unbind(0))

    # ------------------------------------------------------------------------------------------ decoder layers

    def read_layer_inputs(self, args: tuple, kwargs: dict) -> LayerInputs:
        hidden = args[0] if args else kwargs["hidden_states"]
        return LayerInputs(
            hidden_states=hidden,
            attention_mask=kwargs.get("attention_mask"),
            position_ids=kwargs.get("position_ids"),
            position_embeddings=kwargs.get("position_embeddings"),
            cache=kwargs.get("cache", kwargs.get("past_key_values")),
        )

    def write_layer_inputs(self, args: tuple, kwargs: dict, **updates) -> tuple[tuple, dict]:
        """Return (args, kwargs) with hidden_states / attention_mask / position_ids / position_embeddings replaced."""
        kwargs = dict(kwargs)
        if "hidden_states" in updates:
            hidden = updates.pop("hidden_states")
            if args:
                args = (hidden, *args[1:])
            else:
                kwargs["hidden_states"] = hidden
        kwargs.update(updates)
        return args, kwargs

    def gather_position_ids(self, position_ids: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
        """Position ids [B or 1, T] -> [B, L] at index [B, L]."""
        if position_ids is None:
            return None
        return gather_tokens(position_ids, index, token_dim=1)

    def gather_position_embeddings(self, position_embeddings, index: torch.Tensor):
        """(cos, sin), each [..., B or 1, T, D] -> [..., B, L, D] at index [B, L]."""
        if position_embeddings is None:
            return None
        return tuple(gather_tokens(part, index, token_dim=self.position_token_dim) for part in position_embeddings)


def gated_mlp_parts(decoder_layer: nn.Module, layer: int) -> FFNParts:
    """The FFN parts of a decoder layer whose `mlp` has gate_proj, up_proj, down_proj and act_fn (the SwiGLU /
    GeGLU MLP of Llama, Mistral, Qwen2/3, Gemma 3 and most current language models)."""
    mlp = getattr(decoder_layer, "mlp", None)
    missing = [name for name in ("gate_proj", "up_proj", "down_proj", "act_fn") if not hasattr(mlp, name)]
    if missing:
        found = type(mlp).__name__
        raise UnsupportedModelError(f"decoder layer {layer}: the FFN ({found}) has no {', '.join(missing)}")
    return FFNParts(module=mlp, up=mlp.up_proj, down=mlp.down_proj, act=mlp.act_fn, gate=mlp.gate_proj)


def gather_tokens(values: torch.Tensor, index: torch.Tensor, token_dim: int) -> torch.Tensor:
    """values[b, index[b, l], ...] along token_dim, broadcasting a batch dim of 1: -> token_dim of size L."""
    batch = index.shape[0]
    batch_dim = token_dim - 1
    if values.shape[batch_dim] != batch:
        values = values.expand(*values.shape[:batch_dim], batch, *values.shape[batch_dim + 1 :])
    shape = list(values.shape)
    shape[token_dim] = index.shape[1]
    view = [1] * values.dim()
    view[batch_dim], view[token_dim] = batch, index.shape[1]
    return values.gather(token_dim, index.view(view).expand(shape))


def bind_arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    """The call's arguments by name: positional ones named from the signature, keyword ones as given."""
    positional = [
        parameter.name
        for parameter in signature.parameters.values()
        if parameter.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    arguments = dict(zip(positional, args))
    arguments.update(kwargs)
    return arguments
