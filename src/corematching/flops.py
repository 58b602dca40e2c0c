"""Analytic FLOPs of a LLaVA-style model, from its module shapes and what a method actually kept.

Counted: every matrix multiply, at 2 FLOPs per multiply-add (2 * m * n * k):
  - language model, per decoder layer and token present at that layer: the attention projections (every
    nn.Linear of the attention block), attention scores and values over the keys the token attends to
    (causal: the tokens present at that layer up to and including itself; 2 * heads * head_dim per key for
    each), and the FFN (gate, up, down) over the neurons it computes (all in prefill; the core neurons while
    decoding when the method decodes with them);
  - the LM head for one token per forward (generation keeps the last token's logits only);
  - the vision tower (patch embedding, every encoder layer's linear maps, bidirectional attention over all
    its tokens) and the projector, per image, from the shapes for a LLaVA-style model; for any other layout
    (tiled images, patch mergers, video frames) `measured_vision_flops` counts them on a real dense pass with
    torch's FlopCounterMode: everything outside the language model's decoder and the LM head.
Not counted: norms, activation functions, RoPE, softmax, embedding lookups, the methods' own selection
(O(tokens * d_ff) comparisons, no multiplies of note).

Which tokens are present at a layer comes from the session's record (`session.last`): every prompt token up
to and including `prune_layer`, the `kept_positions` after it; the FFN width while decoding comes from
`core_neurons`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class LayerShape:
    projection_macs: int  # multiply-adds per token of the attention block's linear maps
    attention_width: int  # heads * head_dim of the queries: multiply-adds per key, for scores and for values each
    hidden: int  # the FFN's input width
    ffn_width: int  # d_ff
    ffn_matrices: int  # 3 for a gated FFN (gate, up, down), 2 otherwise


@dataclass(frozen=True)
class VisionShape:
    tokens: int  # tokens through the tower per image (patches, plus a CLS token where it has one)
    patch_macs: int  # multiply-adds of the patch embedding per image
    layer_macs_per_token: tuple[int, ...]  # per encoder layer: its linear maps
    attention_width: tuple[int, ...]  # per encoder layer: heads * head_dim
    projector_macs_per_token: int
    projected_tokens: int  # image features per image entering the language model


@dataclass(frozen=True)
class ModelShapes:
    layers: tuple[LayerShape, ...]
    lm_head_macs: int  # per token
    vision: VisionShape | None


def linear_macs(module: nn.Module) -> int:
    """Multiply-adds per token of every nn.Linear inside `module` (weights are [out, in])."""
    return sum(m.weight.shape[0] * m.weight.shape[1] for m in module.modules() if isinstance(m, nn.Linear))


def attention_block(layer: nn.Module) -> nn.Module:
    for name in ("self_attn", "attention", "attn"):
        if hasattr(layer, name):
            return getattr(layer, name)
    raise ValueError(f"cannot find the attention block of {type(layer).__name__}")


def query_width(attention: nn.Module) -> int:
    for name in ("q_proj", "query", "q"):
        if isinstance(getattr(attention, name, None), nn.Linear):
            return getattr(attention, name).weight.shape[0]
    raise ValueError(f"cannot find the query projection of {type(attention).__name__}")


def language_shapes(model) -> tuple[tuple[LayerShape, ...], int]:
    from .models import adapter_for

    adapter = adapter_for(model)
    layers = []
    for index, layer in enumerate(adapter.decoder_layers):
        attention = attention_block(layer)
        ffn = adapter.ffn(index)
        layers.append(
            LayerShape(
                projection_macs=linear_macs(attention),
                attention_width=query_width(attention),
                hidden=ffn.up.weight.shape[1],
                ffn_width=ffn.up.weight.shape[0],
                ffn_matrices=3 if ffn.gate is not None else 2,
            )
        )
    head = model.get_output_embeddings()
    lm_head = head.weight.shape[0] * head.weight.shape[1] if head is not None else 0
    return tuple(layers), lm_head


def vision_shape(model) -> VisionShape | None:
    """The vision tower and projector of a LLaVA-style model (CLIP- or SigLIP-like tower, one square image of
    image_size), or None for other layouts."""
    from .models import adapter_for

    if type(model).__name__ not in ("LlavaForConditionalGeneration", "LlavaModel"):
        return None  # other layouts (anyres crops, video frames, ...) take more than one tower pass per image
    inner = getattr(model, "model", model)
    tower = getattr(inner, "vision_tower", None)
    projector = getattr(inner, "multi_modal_projector", None)
    if tower is None or projector is None:
        return None
    vision_model = getattr(tower, "vision_model", tower)
    embeddings = getattr(vision_model, "embeddings", None)
    conv = getattr(embeddings, "patch_embedding", None)
    encoder = getattr(vision_model, "encoder", None)
    grid = adapter_for(model).image_grid  # the tower's patch grid, as the adapter reads it
    if not isinstance(conv, nn.Conv2d) or not hasattr(encoder, "layers") or grid is None:
        return None  # not a CLIP/SigLIP-like tower: left uncounted (bench marks it)
    patches = grid[0] * grid[1]
    has_cls = hasattr(embeddings, "class_embedding")
    encoder_layers = list(encoder.layers)
    strategy = getattr(model.config, "vision_feature_select_strategy", "default")
    return VisionShape(
        tokens=patches + int(has_cls),
        patch_macs=patches * conv.weight[0].numel() * conv.weight.shape[0],
        layer_macs_per_token=tuple(linear_macs(layer) for layer in encoder_layers),
        attention_width=tuple(query_width(attention_block(layer)) for layer in encoder_layers),
        projector_macs_per_token=linear_macs(projector),
        projected_tokens=patches + int(has_cls and strategy == "full"),
    )


def measured_vision_flops(model, inputs: dict, language_model: nn.Module) -> float:
    """FLOPs of a dense forward of `model` on `inputs` outside `language_model` (the decoder stack) and the LM
    head: the vision tower, projector and any patch merger, as torch's FlopCounterMode counts the real ops (2 per
    multiply-add, like this module). Works for any family; it costs one dense forward."""
    names = {module: name for name, module in model.named_modules()}
    prefix = type(model).__name__
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    excluded = [f"{prefix}.{names[m]}" for m in (language_model, head) if m is not None and names.get(m)]
    # sdpa on CPU runs an op torch's counter does not know; count it like the other fused attention kernels
    def cpu_sdpa(query, key, value, *args, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query, key, value)

    cpu_attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa}
    with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter, torch.no_grad():
        model(**inputs)
    counts = counter.get_flop_counts()
    total = sum(counts.get("Global", {}).values())
    return float(total - sum(sum(counts.get(name, {}).values()) for name in excluded))


def model_shapes(model) -> ModelShapes:
    layers, lm_head = language_shapes(model)
    return ModelShapes(layers=layers, lm_head_macs=lm_head, vision=vision_shape(model))


# ---------------------------------------------------------------------------------------------- counts


def causal_keys(tokens: int) -> int:
    """Sum over `tokens` queries of the keys each attends to causally."""
    return tokens * (tokens + 1) // 2


def layer_flops(shape: LayerShape, queries: int, keys: int, ffn_width: int | None = None) -> float:
    """One decoder layer for `queries` tokens whose attention spans sum to `keys`, computing `ffn_width`
    neurons (all by default)."""
    width = shape.ffn_width if ffn_width is None else ffn_width
    macs = (
        queries * shape.projection_macs
        + 2 * keys * shape.attention_width
        + queries * shape.ffn_matrices * shape.hidden * width
    )
    return 2.0 * macs


def vision_flops(shape: VisionShape | None, images: int) -> float:
    if shape is None or images == 0:
        return 0.0
    per_image = shape.patch_macs
    for macs, width in zip(shape.layer_macs_per_token, shape.attention_width):
        per_image += shape.tokens * macs + 2 * shape.tokens * shape.tokens * width
    per_image += shape.projected_tokens * shape.projector_macs_per_token
    return 2.0 * per_image * images


def prefill_flops(shapes: ModelShapes, tokens_per_layer: list[int]) -> float:
    """The language model's prompt pass (dense FFNs), LM head on the last token; vision not included."""
    total = sum(layer_flops(shape, n, causal_keys(n)) for shape, n in zip(shapes.layers, tokens_per_layer))
    return total + 2.0 * shapes.lm_head_macs


def decode_flops(shapes: ModelShapes, tokens_per_layer: list[int], ffn_widths: list[int | None], step: int) -> float:
    """One decode step: generated token number `step` (1 = the first one fed back) attends to the prompt tokens
    present at each layer plus the `step` generated tokens so far (itself included)."""
    total = sum(
        layer_flops(shape, 1, n + step, width)
        for shape, n, width in zip(shapes.layers, tokens_per_layer, ffn_widths)
    )
    return total + 2.0 * shapes.lm_head_macs


def tokens_per_layer(record, sample: int, prompt_length: int, num_layers: int) -> list[int]:
    """Prompt tokens present at each decoder layer: all up to the first prune layer, after each prune stage's
    layer the tokens that stage kept."""
    if record is None or record.prune_layer is None:
        return [prompt_length] * num_layers
    stages = record.stage_keep_masks or {record.prune_layer: record.keep_mask}
    kept = {layer: int(mask[sample].sum()) for layer, mask in stages.items()}
    counts, present = [], prompt_length
    for layer in range(num_layers):
        counts.append(present)
        present = kept.get(layer, present)  # the layers after a stage's layer see what it kept
    return counts


def decode_widths(record, sample: int, num_layers: int) -> list[int | None]:
    """FFN neurons computed per layer while decoding (None: all of them)."""
    neurons = {} if record is None else record.core_neurons_per_sample[sample]
    return [len(neurons[layer]) if layer in neurons else None for layer in range(num_layers)]


@dataclass
class SampleFlops:
    vision: float  # vision tower + projector
    prefill: float  # language model prompt pass, LM head included
    decode_per_token: float  # mean over the decode steps of a run with new_tokens new tokens
    tokens_per_layer: list[int]
    decode_widths: list[int | None]

    @property
    def prefill_total(self) -> float:
        return self.vision + self.prefill


def sample_flops(shapes: ModelShapes, record, prompt_length: int, images: int = 1, new_tokens: int = 2,
                 sample: int = 0) -> SampleFlops:
    """FLOPs of one sample of a generate call under a session, from the session's record of its prefill.

    prompt_length: the sample's prompt tokens (without padding). new_tokens: generated tokens; the first comes
    from the prefill, each further one costs a decode step, and the decode cost is their mean.
    """
    num_layers = len(shapes.layers)
    present = tokens_per_layer(record, sample, prompt_length, num_layers)
    widths = decode_widths(record, sample, num_layers)
    steps = range(1, max(2, new_tokens))
    decode = sum(decode_flops(shapes, present, widths, step) for step in steps) / len(steps)
    return SampleFlops(
        vision=vision_flops(shapes.vision, images),
        prefill=prefill_flops(shapes, present),
        decode_per_token=decode,
        tokens_per_layer=present,
        decode_widths=widths,
    )
