"""What the layers of each prune stage attend to, once tokens were removed: keys, masks, positions, cache slots.

A stage's layers hold, in their KV cache, the slots of the tokens that went past the stage in earlier calls (a
CacheState's StageSlots: each slot's full-sequence index and validity), and in this call they get the call's kept
tokens after those. So each stage's keys are (cached slots, then the call's kept tokens), all in full-sequence
indices; the attention mask is built from those indices with the layer's AttentionRule (masks.py), once per stage
and rule, over the key window the cache keeps (a sliding-window or static cache keeps fewer or more slots). The
position ids and position embeddings are gathered at the kept tokens. After the call, `stage_slots_after` gives
each stage's slots with the call's kept tokens appended: the CacheState the next call reads.
"""

import torch
from transformers.cache_utils import BaseQuantizedLayer

from ..errors import UnsupportedModeError
from ..models import ModelAdapter
from .cache_state import CacheState, StageSlots
from .live_call import LiveCall, StageCall
from .masks import upper_attention_mask


def prepare_stage_keys(adapter: ModelAdapter, call: LiveCall, stage_index: int, stage: StageCall, inputs) -> None:
    """The keys the stage's layers attend to in this call (cached slots, then the call's kept tokens), and
    the gathered positions of the kept tokens."""
    plan = call.plan
    state = plan.state
    removed_before = state is not None and state.removed_tokens
    if stage.layout is None and not removed_before:
        return  # nothing removed so far: these layers run as in the dense model
    if removed_before:
        cached = state.stages[stage_index]
        cached_index, cached_valid, all_cached_valid = cached.index, cached.valid, cached.all_valid
    else:  # a dense cache, or none: only a 2-D mask can mark a slot invalid
        cached_index, cached_valid = dense_slots(call)
        all_cached_valid = plan.past == 0 or plan.entry.attention_mask is None
    layout = stage.layout
    if layout is not None:
        new_index, new_valid, all_new_valid = layout.source_index, layout.slot_valid, layout.all_valid
    else:
        new_index = torch.arange(plan.valid.shape[1], device=plan.valid.device).expand_as(plan.valid)
        new_valid, all_new_valid = plan.valid, plan.entry.attention_mask is None
    new_group = plan.images.image_index.gather(1, new_index) if plan.images is not None else None
    stage.keys = (
        torch.cat([cached_index, new_index + plan.past], dim=1),
        torch.cat([cached_valid, new_valid], dim=1),
        all_cached_valid and all_new_valid,
        new_group,  # [B, q'] image of each new kept token (-1: text), for bidirectional image attention
    )
    if layout is not None:
        stage.inputs["position_ids"] = adapter.gather_position_ids(inputs.position_ids, layout.source_index)


def upper_positions(adapter: ModelAdapter, stage: StageCall, inputs) -> dict:
    """The position inputs of a stage's layer: the gathered position ids, and the position embeddings this
    layer received gathered at the kept tokens. Layers may receive different embeddings (Gemma 3's local and
    global layers have their own rotary bases); each distinct one is gathered once per stage and call."""
    if stage.layout is None:
        return stage.inputs
    source = inputs.position_embeddings
    gathered = next((done for seen, done in stage.embeddings if seen is source), None)
    if gathered is None:
        gathered = adapter.gather_position_embeddings(source, stage.layout.source_index)
        stage.embeddings.append((source, gathered))
    return {**stage.inputs, "position_embeddings": gathered}


def upper_mask(adapter: ModelAdapter, call: LiveCall, stage_index: int, layer: int, inputs):
    """The attention mask of layer `layer` (of stage `stage_index`) for this call, built once for the stage's
    layers with the same rule (their caches hold the same slots, so they see the same key window)."""
    stage = call.tokens.stages[stage_index]
    rule = call.plan.rules[layer]
    if rule not in stage.masks:
        key_index, key_valid, all_valid, new_group = stage.keys
        num_queries = key_index.shape[1] - _cached_slots(call, stage_index)
        offset, mask_length = _key_window(inputs.cache, layer, num_queries, key_index.shape[1])
        # packed rows come without a cache: the keys are the call's own tokens
        sequences = call.tokens.sequences
        key_sequence = None if sequences is None else sequences.gather(1, key_index[:, offset:])
        stage.masks[rule] = upper_attention_mask(
            key_index[:, offset:],
            key_valid[:, offset:],
            num_queries,
            rule,
            new_group,
            adapter.attention_implementation(),
            inputs.hidden_states.dtype,
            all_valid and offset == 0,
            mask_length,
            key_sequence,
        )
    return stage.masks[rule]


def stage_slots_after(call: LiveCall, state: CacheState, num_stages: int) -> list[StageSlots]:
    """Each stage's slots once this call's tokens are added: the cached ones, then the call's kept ones."""
    plan = call.plan
    past, device = plan.past, plan.valid.device
    if state.removed_tokens:
        cached = state.stages
    else:
        index, valid = dense_slots(call)
        cached = [StageSlots(index, valid, bool(valid.all()))] * num_stages
    in_place = None  # the call's tokens, every one in place (a stage that removed none of them)
    slots = []
    for old, stage in zip(cached, call.tokens.stages):
        if stage.layout is not None:
            layout = stage.layout
            new = StageSlots(layout.source_index + past, layout.slot_valid, layout.all_valid)
        else:
            if in_place is None:
                all_valid = plan.entry.attention_mask is None or bool(plan.valid.all())  # one check per call
                index = torch.arange(past, past + plan.valid.shape[1], device=device).expand_as(plan.valid)
                in_place = StageSlots(index, plan.valid, all_valid)
            new = in_place
        slots.append(
            StageSlots(
                torch.cat([old.index, new.index], dim=1),
                torch.cat([old.valid, new.valid], dim=1),
                old.all_valid and new.all_valid,
            )
        )
    return slots


def dense_slots(call: LiveCall) -> tuple[torch.Tensor, torch.Tensor]:
    """The slots of a cache whose past tokens all went through every layer: [B, past] index and validity."""
    plan = call.plan
    batch, past, device = plan.valid.shape[0], plan.past, plan.valid.device
    index = torch.arange(past, device=device).expand(batch, past)
    mask = plan.entry.attention_mask
    if mask is None:
        return index, torch.ones_like(index, dtype=torch.bool)
    return index, mask[:, :past].to(device=device, dtype=torch.bool)


def _key_window(cache, layer: int, num_queries: int, num_keys: int) -> tuple[int, int]:
    """(first slot, mask length) of the keys layer `layer`'s attention sees: every slot, the last ones a
    sliding-window cache keeps, or a static cache's whole buffer."""
    if cache is None:
        return 0, num_keys
    layers = getattr(cache, "layers", None)
    if layers is not None and layer < len(layers):
        cache_layer = layers[layer]
        if isinstance(cache_layer, BaseQuantizedLayer):
            raise UnsupportedModeError(
                "a quantized KV cache: it calibrates its quantization on the tokens it holds, which token "
                "removal changes, so the result would differ from the dense model's; use an unquantized cache"
            )
        found = int(cache_layer.get_seq_length())
        if found != num_keys - num_queries:
            raise UnsupportedModeError(
                f"the KV cache of layer {layer} holds {found} tokens, but the sparsified sequence so far has "
                f"{num_keys - num_queries}: the cache was changed outside the session"
            )
    length, offset = cache.get_mask_sizes(num_queries, layer)
    length, offset = int(length), int(offset)
    if offset + length < num_keys:
        raise UnsupportedModeError(f"a KV cache of type {type(cache).__name__} that drops keys the mask needs")
    return offset, length


def _cached_slots(call: LiveCall, stage_index: int) -> int:
    """Slots the layers of a stage held before this call."""
    state = call.plan.state
    if state is not None and state.removed_tokens:
        return state.stages[stage_index].width
    return call.plan.past
