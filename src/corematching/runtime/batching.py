"""Conversations decoding together, joining and leaving between decode steps (continuous batching).

A `DecodeBatch` is one KV cache whose rows are conversations prefilled at different times, with the 2-D padding
mask and the next position of each row. Its rows are left-padded to a common length:
  - the layers that hold every token (up to the first prune layer) hold each row's full sequence after
    `length - row length` padding slots, masked by `attention_mask`;
  - the layers after each prune stage hold each row's kept slots after padding slots of their own (rows keep
    different numbers of tokens); the cache state (cache_state.py) marks those slots invalid, and the index of
    every real slot is its index in the padded full sequence, so causality and sliding windows compare the
    distances of the conversation alone;
  - each row keeps its own position (`next_positions`: the number of its real tokens, plus the offset the model
    keeps between index and position, Qwen-VL's rope_deltas), so padding never moves a row's positions;
  - each row keeps its prune stages and its core neurons: the merged cache state holds one neuron decision with
    a row per conversation (the union slice with per-row masks of runtime/ffn.py decodes them together, rows
    without core neurons dense), and the conversation state (rope_deltas) row by row.
So a row's logits are those of its conversation decoded alone: nothing of a batch mate reaches it (masked
slots contribute nothing to attention, every other computation is row by row).

`merge_batches` joins batches (new prefills into the running batch), `DecodeBatch.select` keeps some rows
(finished rows leave) and trims the padding no row needs any more, `DecodeBatch.step` runs one decode step.
Only DynamicCache layers holding every slot are merged (no sliding-window, static or quantized layers).
"""

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from ..errors import UnsupportedModeError
from ..models import adapter_for
from .cache_state import (
    CacheState,
    NeuronDecision,
    StageSlots,
    attach_conversation,
    attach_state,
    conversation_of,
    stage_of_layer,
    state_of,
)

POSITION_OFFSET = "rope_deltas"  # conversation-state entry: a row's position minus its token count ([B, 1])


@dataclass
class DecodeBatch:
    """Rows decoding together: one KV cache, left-padded to a common length."""

    cache: object  # a DynamicCache (with the session's cache state when one filled it)
    attention_mask: torch.Tensor  # [B, L] long: 1 at each row's real tokens in the layers that hold every token
    next_positions: torch.Tensor  # [B] long: the position of each row's next token

    @property
    def rows(self) -> int:
        return self.attention_mask.shape[0]

    @property
    def length(self) -> int:
        """Slots of the full sequence (padding included) that the layers up to the first prune layer hold."""
        return self.attention_mask.shape[1]

    def step(self, model, tokens: torch.Tensor) -> torch.Tensor:
        """Feed tokens [B] (each row's newest token) and return the next-token logits [B, V]."""
        if tokens.shape != (self.rows,):
            raise ValueError(f"tokens must have shape ({self.rows},), one per row, got {tuple(tokens.shape)}")
        ones = torch.ones_like(self.attention_mask[:, :1])
        mask = torch.cat([self.attention_mask, ones], dim=1)
        out = model(
            input_ids=tokens.view(-1, 1).to(self.attention_mask.device),
            attention_mask=mask,
            position_ids=self.next_positions.view(-1, 1),
            cache=self.cache,
            use_cache=True,
        )
        self.attention_mask = mask
        self.next_positions = self.next_positions + 1
        return out.logits[:, -1]

    def select(self, rows: torch.Tensor | list[int]) -> None:
        """Keep only `rows` (in that order), then drop the leading slots that are padding in every row left."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.attention_mask.device).flatten()
        if rows.numel() == 0:
            raise ValueError("select needs at least one row (drop the batch instead)")
        self.cache.batch_select_indices(rows)  # the cache state and conversation state follow (cache_state.py)
        self.attention_mask = self.attention_mask.index_select(0, rows)
        self.next_positions = self.next_positions.index_select(0, rows)
        self._trim_padding()

    def _trim_padding(self) -> None:
        state = state_of(self.cache)
        stage_layers = _stage_layers(self.cache)
        full = _leading_padding(self.attention_mask.bool())
        stages = [] if state is None else [_leading_padding(stage.valid) for stage in state.stages]
        if full == 0 and not any(stages):
            return
        for index, layer in enumerate(self.cache.layers):
            stage = stage_of_layer(stage_layers, index) if stages else -1
            cut = full if stage < 0 else stages[stage]
            if cut:
                layer.keys, layer.values = layer.keys[:, :, cut:], layer.values[:, :, cut:]
        self.attention_mask = self.attention_mask[:, full:]
        if state is not None:
            state.length -= full
            state.stages = [
                StageSlots((stage.index[:, cut:] - full).clamp(min=0), stage.valid[:, cut:], stage.all_valid)
                for stage, cut in zip(state.stages, stages)
            ]


def prefill_batch(model, inputs: dict, **generate_options) -> tuple[DecodeBatch, torch.Tensor]:
    """Prefill prompts (the processor's inputs, left-padded when there are several) and return them as a batch
    ready to decode, with the logits of each row's first new token [B, V]. The prefill is one `generate` step,
    so every family places its prompt's positions as it does in generate (M-RoPE included)."""
    input_ids = inputs.get("input_ids")
    if input_ids is None:
        raise ValueError("prefill_batch needs input_ids")
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else mask.to(torch.long)
    cache = DynamicCache()
    out = model.generate(
        **{**inputs, "attention_mask": mask},
        cache=cache,
        max_new_tokens=1,
        min_new_tokens=0,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **generate_options,
    )
    next_positions = mask.sum(1)
    offset = _position_offset(model, cache, input_ids.shape[0])
    if offset is not None:
        next_positions = next_positions + offset.view(-1).to(next_positions.device)
    return DecodeBatch(cache, mask, next_positions), out.logits[0]


def merge_batches(batches: list[DecodeBatch]) -> DecodeBatch:
    """One batch holding the rows of `batches` in order (each row left-padded to the longest); the inputs are
    consumed (their caches must not be used any more)."""
    if not batches:
        raise ValueError("merge_batches needs at least one batch")
    if len(batches) == 1:
        return batches[0]
    caches = [batch.cache for batch in batches]
    for cache in caches:
        _check_mergeable(cache)
    states = [state_of(cache) for cache in caches]
    owners = {id(state.owner): state.owner for state in states if state is not None}
    if len(owners) > 1:
        raise UnsupportedModeError(
            "merging KV caches filled under different corematching sessions: each session's decisions are read by "
            "its own engine; decode them in separate batches"
        )
    owner = next(iter(owners.values()), None)
    if owner is not None and not owner.active:
        raise UnsupportedModeError(
            f"merging KV caches whose corematching session ({owner.description}) has been removed"
        )
    stage_layers = next((_stage_layers(c) for c, s in zip(caches, states) if s is not None and s.stages), ())
    length = max(batch.length for batch in batches)
    pads = [length - batch.length for batch in batches]
    # each batch's slots per stage: (index in its own full sequence [b, w], valid [b, w])
    slots = [_stage_slots(batch, state, len(stage_layers)) for batch, state in zip(batches, states)]
    widths = [max(own[s][0].shape[1] for own in slots) for s in range(len(stage_layers))]
    merged = DynamicCache()
    num_layers = len(caches[0].layers)
    if any(len(cache.layers) != num_layers for cache in caches):
        raise ValueError("merge_batches: the caches have different numbers of layers")
    for index in range(num_layers):
        stage = stage_of_layer(stage_layers, index)
        keys, values = [], []
        width = length if stage < 0 else widths[stage]
        for cache in caches:
            layer = cache.layers[index]
            missing = width - layer.keys.shape[2]
            keys.append(_left_pad(layer.keys, missing))
            values.append(_left_pad(layer.values, missing))
        merged.update(torch.cat(keys), torch.cat(values), index)
    if stage_layers or owner is not None:
        stages = []
        for s, width in enumerate(widths):
            index = torch.cat([_left_pad_rows(own[s][0] + pad, width - own[s][0].shape[1], 0)
                               for own, pad in zip(slots, pads)])
            valid = torch.cat([_left_pad_rows(own[s][1], width - own[s][1].shape[1], False) for own in slots])
            stages.append(StageSlots(index, valid, bool(valid.all())))
        decision, decision_rows = _merged_decision(batches, states)
        attach_state(merged, CacheState(owner, length, stages, decision, decision_rows), stage_layers)
    conversation = _merged_conversation(caches)
    if conversation is not None:
        attach_conversation(merged, conversation)
    mask = torch.cat([_left_pad_rows(batch.attention_mask, pad, 0) for batch, pad in zip(batches, pads)])
    next_positions = torch.cat([batch.next_positions for batch in batches])
    return DecodeBatch(merged, mask, next_positions)


def kv_bytes(batch: DecodeBatch) -> int:
    """Memory of the batch's KV cache (padding slots included)."""
    return sum(t.numel() * t.element_size() for layer in batch.cache.layers for t in (layer.keys, layer.values)
               if t is not None)


def row_kv_bytes(batch: DecodeBatch) -> list[int]:
    """Per row: the KV bytes of the slots its layers really hold (its real tokens up to the first prune layer, its
    kept tokens after each prune stage; padding not counted)."""
    state = state_of(batch.cache)
    stage_layers = _stage_layers(batch.cache) if state is not None and state.stages else ()
    full = batch.attention_mask.sum(1)
    kept = [stage.valid.sum(1) for stage in state.stages] if stage_layers else []
    total = torch.zeros_like(full)
    for index, layer in enumerate(batch.cache.layers):
        stage = stage_of_layer(stage_layers, index)
        per_slot = 2 * layer.keys.shape[1] * layer.keys.shape[3] * layer.keys.element_size()
        total = total + (full if stage < 0 else kept[stage].to(full.device)) * per_slot
    return [int(value) for value in total.tolist()]


# ------------------------------------------------------------------------------------------------ helpers


def _position_offset(model, cache, rows: int) -> torch.Tensor | None:
    """[B, 1] position minus token count of each row after a prefill (None: positions are token counts)."""
    conversation = conversation_of(cache)
    values = conversation.values if conversation is not None else None
    if values is None:
        try:
            values = adapter_for(model).conversation_state()
        except Exception:  # not a supported VLM (a plain causal LM): positions are token counts
            values = None
    offset = None if values is None else values.get(POSITION_OFFSET)
    if offset is None:
        return None
    if offset.shape[0] != rows:
        offset = offset.repeat_interleave(rows // offset.shape[0], dim=0)
    return offset


def _check_mergeable(cache) -> None:
    if not isinstance(cache, DynamicCache):
        raise UnsupportedModeError(
            f"merging a KV cache of type {type(cache).__name__}: continuous batching merges DynamicCache rows"
        )
    for index, layer in enumerate(cache.layers):
        if isinstance(layer, DynamicSlidingWindowLayer) or type(layer) is not DynamicLayer:
            raise UnsupportedModeError(
                f"merging a KV cache whose layer {index} is a {type(layer).__name__}: continuous batching pads and "
                "joins layers that hold every slot (DynamicLayer); sliding-window and quantized layers are not"
            )
        if not layer.is_initialized:
            raise ValueError(f"merging a KV cache whose layer {index} holds nothing: prefill it first")


def _stage_layers(cache) -> tuple[int, ...]:
    return tuple(getattr(cache, "_corematching_stage_layers", ()))


def _stage_slots(batch: DecodeBatch, state: CacheState | None, num_stages: int) -> list[tuple]:
    """Per prune stage: (full-sequence index [b, w], valid [b, w]) of the slots its layers hold for this batch's
    rows; a cache where nothing was removed holds every token there."""
    if state is not None and state.stages:
        if len(state.stages) != num_stages:
            raise UnsupportedModeError("merging KV caches pruned in different numbers of stages")
        return [(stage.index, stage.valid) for stage in state.stages]
    device = batch.attention_mask.device
    index = torch.arange(batch.length, device=device).expand(batch.rows, -1)
    return [(index, batch.attention_mask.bool())] * num_stages


def _merged_decision(batches, states) -> tuple[NeuronDecision | None, torch.Tensor | None]:
    """One decision with a row per merged row: each row's own core neurons (padded to a common width by repeating
    its last neuron, which changes no set), rows without core neurons dense."""
    decisions = [None if state is None else state.decision for state in states]
    if all(decision is None for decision in decisions):
        return None, None
    layers = {frozenset(decision.neurons) for decision in decisions if decision is not None}
    if len(layers) > 1:
        raise UnsupportedModeError("merging KV caches whose core neurons cover different layers")
    layers = sorted(next(iter(layers)))
    width = {layer: max(d.neurons[layer].shape[1] for d in decisions if d is not None) for layer in layers}
    neurons = {layer: [] for layer in layers}
    sparse_rows = []
    for batch, state, decision in zip(batches, states, decisions):
        if decision is None:
            sparse_rows.append(torch.zeros(batch.rows, dtype=torch.bool, device=batch.attention_mask.device))
            for layer in layers:
                neurons[layer].append(torch.zeros(batch.rows, width[layer], dtype=torch.long,
                                                  device=batch.attention_mask.device))
            continue
        rows = state.decision_rows
        sparse_rows.append(decision.sparse_rows[rows])
        for layer in layers:
            own = decision.neurons[layer][rows]
            repeat = own[:, -1:].expand(-1, width[layer] - own.shape[1])
            neurons[layer].append(torch.cat([own, repeat], dim=1))
    sparse = torch.cat(sparse_rows)
    device = sparse.device
    neurons = {layer: torch.cat([part.to(device) for part in parts]) for layer, parts in neurons.items()}
    decision = NeuronDecision(neurons, sparse, all_sparse=bool(sparse.all()))
    return decision, torch.arange(sparse.shape[0], device=device)


def _merged_conversation(caches) -> dict | None:
    conversations = [conversation_of(cache) for cache in caches]
    if all(conversation is None for conversation in conversations):
        return None
    if any(conversation is None for conversation in conversations):
        raise UnsupportedModeError(
            "merging KV caches of which only some carry the model's conversation state (Qwen-VL's rope_deltas): "
            "prefill every row under the same session"
        )
    names = conversations[0].values.keys()
    merged = {}
    for name in names:
        values = [conversation.values.get(name) for conversation in conversations]
        if all(value is None for value in values):
            merged[name] = None
        elif any(value is None for value in values):
            raise UnsupportedModeError(f"merging KV caches of which only some know their {name}")
        else:
            merged[name] = torch.cat([value.to(values[0].device) for value in values])
    return merged


def _leading_padding(valid: torch.Tensor) -> int:
    """Leading columns of valid [B, L] that are False in every row."""
    any_valid = valid.any(0)
    if not bool(any_valid.any()):
        return 0
    return int(any_valid.to(torch.int8).argmax())


def _left_pad(tensor: torch.Tensor, count: int) -> torch.Tensor:
    """tensor [B, heads, S, D] with `count` zero slots in front."""
    if count == 0:
        return tensor
    shape = list(tensor.shape)
    shape[2] = count
    return torch.cat([tensor.new_zeros(shape), tensor], dim=2)


def _left_pad_rows(tensor: torch.Tensor, count: int, fill) -> torch.Tensor:
    """tensor [B, S] with `count` columns of `fill` in front."""
    if count == 0:
        return tensor
    return torch.cat([torch.full((tensor.shape[0], count), fill, dtype=tensor.dtype, device=tensor.device),
                      tensor], dim=1)
