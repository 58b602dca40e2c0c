"""Token removal: the layers after each prune stage run on the tokens the method kept, packed per sample.

At the entry of layer K + 1 (K a stage's prune layer) of a call that chooses tokens, the method gets a TokenBatch
over the tokens the previous stage kept (the first stage: all of the call's) and returns which visual tokens go
on; the kept ones are gathered into packed rows (packing.py). Every layer of the stage then gets:
  - the attention mask over its keys: the cache slots its layers hold (a CacheState says which tokens those are),
    then the call's kept tokens, each at its original position (masks.py builds it once per stage and rule);
  - the position ids and position embeddings gathered at the kept tokens.
A call that removes nothing over a cache that holds every token leaves the layers untouched. After the call,
`stage_slots_after` says which tokens each stage's cache slots hold, for the next call's keys.
"""

import torch
from transformers.cache_utils import BaseQuantizedLayer

from ..errors import UnsupportedModeError
from ..methods import SparsityMethod, TokenBatch
from ..models import ModelAdapter
from .cache_state import CacheState, StageSlots
from .call_plan import CallKind, LayerRoles, LiveCall, StageCall
from .masks import upper_attention_mask
from .method_inputs import MethodInputs
from .packing import PackedLayout, pack_kept_tokens, packed_sequence_ids


class TokenRemoval:
    def __init__(self, adapter: ModelAdapter, method: SparsityMethod, roles: LayerRoles, inputs: MethodInputs):
        self.adapter = adapter
        self.method = method
        self.roles = roles
        self.inputs = inputs
        self._stage_starting = {layer + 1: stage for stage, layer in enumerate(roles.stage_layers)}

    def on_layer(self, call: LiveCall, layer: int, args: tuple, kwargs: dict):
        """Before decoder layer `layer` > K: the rewritten (args, kwargs), or None."""
        inputs = self.adapter.read_layer_inputs(args, kwargs)
        stages = call.tokens.stages
        stage_index = self._stage_starting.get(layer)
        if stage_index is not None:
            stage = self._start_stage(call, stage_index, inputs)
            if stage.hidden_index is not None:  # gather the surviving tokens (with the method's merged states)
                merged, call.tokens.merged_hidden = call.tokens.merged_hidden, None
                hidden = _gather_hidden(inputs.hidden_states if merged is None else merged, stage.hidden_index)
                mask = self._upper_mask(call, stage_index, layer, inputs)
                return self.adapter.write_layer_inputs(
                    args, kwargs, hidden_states=hidden, attention_mask=mask, **self._upper_positions(stage, inputs)
                )
        if not stages or stages[-1].keys is None:
            return None
        stage_index = len(stages) - 1
        mask = self._upper_mask(call, stage_index, layer, inputs)
        positions = self._upper_positions(stages[stage_index], inputs)
        return self.adapter.write_layer_inputs(args, kwargs, attention_mask=mask, **positions)

    def _start_stage(self, call: LiveCall, stage_index: int, inputs) -> StageCall:
        """At the entry of the layer after stage `stage_index`'s layer: choose its tokens (when the call chooses
        tokens) among those the previous stage kept, and prepare what its layers attend to."""
        previous = call.layout
        stage = StageCall(layout=previous)
        if stage_index == 0:
            call.tokens.sequences = self._packed_sequences(call, inputs)
        if call.plan.chooses_tokens:
            chosen = self._choose_tokens(call, stage_index, inputs.hidden_states)  # over the current slots
            stage.hidden_index = chosen.source_index
            if previous is None:
                stage.layout = chosen
            else:
                source = previous.source_index.gather(1, chosen.source_index)
                stage.layout = PackedLayout(source, chosen.slot_valid, chosen.all_valid)
        call.tokens.stages.append(stage)
        self._prepare_stage_keys(call, stage_index, stage, inputs)
        return stage

    def _packed_sequences(self, call: LiveCall, inputs) -> torch.Tensor | None:
        """[B, q]: the packed sequence of each of the call's tokens when the model's own masks keep several prompts
        of a row apart (positions restarting, and neither a 2-D attention mask nor a cache: transformers' rule,
        runtime/packing.py); None otherwise. The masks after the prune layer then keep each prompt in its block."""
        plan = call.plan
        if plan.past or plan.entry.attention_mask is not None or inputs.cache is not None:
            return None
        sequences = packed_sequence_ids(inputs.position_ids, plan.valid.shape[0])
        if sequences is None:
            return None
        mode = "packed sequences (several prompts in one row, position ids restarting at each, no attention mask)"
        if "last_attention" in self.inputs.wanted:
            raise UnsupportedModeError(
                f"{mode} with {type(self.method).__name__}, which reads the last token's attention row over the "
                "whole row; pass one prompt per row"
            )
        if any(rule.bidirectional_images for rule in plan.rules.values()):
            raise UnsupportedModeError(
                f"{mode} with images attended both ways ({self.adapter.family}): transformers composes the image "
                "blocks with packed positions in a way the session does not reproduce; pass one prompt per row"
            )
        return sequences

    def _choose_tokens(self, call: LiveCall, stage_index: int, hidden_states: torch.Tensor) -> PackedLayout:
        """hidden_states [B, q', H]: the input of the layer after the stage's layer, over the tokens the previous
        stage kept (all of the call's at the first stage). Returns the layout of the kept ones among those."""
        plan, tokens, previous = call.plan, call.tokens, call.layout
        images, prune_layer = plan.images, self.roles.prune_layer
        batch = TokenBatch(
            valid_mask=plan.valid,
            visual_mask=plan.visual,
            image_index=images.image_index,
            image_ordinal=images.image_ordinal,
            image_grid=self.adapter.image_grid,
            activations=None,
            grid_rows=images.grid_rows,
            grid_cols=images.grid_cols,
        )
        if previous is not None:
            batch = _tokens_kept_so_far(batch, previous)
        batch.valid_mask = call.decision_valid  # (without assisted decoding's candidates)
        batch.activations, batch.stage = tokens.prune_activations, stage_index
        self.inputs.fill(batch, tokens.captured, plan.entry, plan.visual, hidden_states)
        with torch.no_grad():
            both = stage_index == 0 and plan.kind == CallKind.FRESH and prune_layer in self.roles.neuron_layers
            if both and batch.activations is not None and prune_layer not in call.neurons.chosen:
                decision, call.neurons.chosen[prune_layer] = self.method.select_tokens_and_neurons(
                    batch, call.decision_valid, prune_layer
                )
            else:
                decision = self.method.select_tokens(batch)
        tokens.prune_activations = None
        visual = batch.visual_mask
        keep = batch.valid_mask & (~visual | (decision.keep_visual & visual))  # over the current slots
        if plan.candidates is not None:
            keep |= call.current_valid & ~batch.valid_mask  # the candidates go on
        tokens.keep = keep if previous is None else _on_call_tokens(keep, previous, plan.valid.shape[1])
        tokens.stage_keeps.append(tokens.keep)
        if stage_index == 0:
            tokens.scores = decision.scores
        if decision.merged_hidden is not None:
            if decision.merged_hidden.shape != hidden_states.shape:
                layer = self.roles.stage_layers[stage_index] + 1
                raise ValueError(
                    f"{type(self.method).__name__}: merged_hidden has shape {tuple(decision.merged_hidden.shape)}, "
                    f"the hidden states entering layer {layer} {tuple(hidden_states.shape)}"
                )
            tokens.merged_hidden = decision.merged_hidden.to(hidden_states.dtype)
        return pack_kept_tokens(keep)

    def _prepare_stage_keys(self, call: LiveCall, stage_index: int, stage: StageCall, inputs) -> None:
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
            stage.inputs["position_ids"] = self.adapter.gather_position_ids(inputs.position_ids, layout.source_index)

    def _upper_positions(self, stage: StageCall, inputs) -> dict:
        """The position inputs of a stage's layer: the gathered position ids, and the position embeddings this
        layer received gathered at the kept tokens. Layers may receive different embeddings (Gemma 3's local and
        global layers have their own rotary bases); each distinct one is gathered once per stage and call."""
        if stage.layout is None:
            return stage.inputs
        source = inputs.position_embeddings
        gathered = next((done for seen, done in stage.embeddings if seen is source), None)
        if gathered is None:
            gathered = self.adapter.gather_position_embeddings(source, stage.layout.source_index)
            stage.embeddings.append((source, gathered))
        return {**stage.inputs, "position_embeddings": gathered}

    def _upper_mask(self, call: LiveCall, stage_index: int, layer: int, inputs):
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
                self.adapter.attention_implementation(),
                inputs.hidden_states.dtype,
                all_valid and offset == 0,
                mask_length,
                key_sequence,
            )
        return stage.masks[rule]

    def stage_slots_after(self, call: LiveCall, state: CacheState) -> list[StageSlots]:
        """Each stage's slots once this call's tokens are added: the cached ones, then the call's kept ones."""
        plan = call.plan
        past, device = plan.past, plan.valid.device
        if state.removed_tokens:
            cached = state.stages
        else:
            index, valid = dense_slots(call)
            cached = [StageSlots(index, valid, bool(valid.all()))] * len(self.roles.stage_layers)
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


def _tokens_kept_so_far(batch: TokenBatch, layout: PackedLayout) -> TokenBatch:
    """The batch of the call's tokens [B, q] restricted to a layout's slots [B, L] (padding slots: not valid)."""
    index, slot_valid = layout.source_index, layout.slot_valid

    def gather(values: torch.Tensor | None, outside):
        if values is None:
            return None
        return torch.where(slot_valid, values.gather(1, index), outside)

    return TokenBatch(
        valid_mask=slot_valid,
        visual_mask=gather(batch.visual_mask, False),
        image_index=gather(batch.image_index, -1),
        image_ordinal=gather(batch.image_ordinal, -1),
        image_grid=batch.image_grid,
        activations=None,
        grid_rows=gather(batch.grid_rows, 0),
        grid_cols=gather(batch.grid_cols, 0),
    )


def _on_call_tokens(keep: torch.Tensor, layout: PackedLayout, length: int) -> torch.Tensor:
    """keep [B, L] over a layout's slots -> [B, length] over the call's tokens (False where no slot is)."""
    index = torch.where(layout.slot_valid, layout.source_index, length)  # padding slots go to a spare column
    out = torch.zeros(keep.shape[0], length + 1, dtype=torch.bool, device=keep.device)
    return out.scatter_(1, index, keep & layout.slot_valid)[:, :length]


def _gather_hidden(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, H] at index [B, L] -> [B, L, H]."""
    return hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
