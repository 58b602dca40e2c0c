"""Token removal: the layers after each prune stage run on the tokens the method kept, packed per sample.

At the entry of layer K + 1 (K a stage's prune layer) of a call that chooses tokens, the method gets a TokenBatch
over the tokens the previous stage kept (the first stage: all of the call's) and returns which visual tokens go
on; the kept ones (with the method's merged hidden states, if it merges) are gathered into packed rows
(packing.py). Every layer of the stage then gets, from stage_keys.py:
  - the attention mask over its keys: the cache slots its layers hold (a CacheState says which tokens those are),
    then the call's kept tokens, each at its original position (masks.py builds it once per stage and rule);
  - the position ids and position embeddings gathered at the kept tokens.
A call that removes nothing over a cache that holds every token leaves the layers untouched. Several prompts
packed in one row (position ids restarting, no mask, no cache) keep their blocks apart in those masks; assisted
decoding's candidates take no part in the choice and always go on.
"""

import torch

from ..errors import UnsupportedModeError
from ..methods import SparsityMethod, TokenBatch
from ..models import ModelAdapter
from .call_plan import CallKind, LayerRoles
from .live_call import LiveCall, StageCall
from .method_inputs import MethodInputs
from .packing import PackedLayout, pack_kept_tokens, packed_sequence_ids
from .stage_keys import prepare_stage_keys, upper_mask, upper_positions


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
                mask = upper_mask(self.adapter, call, stage_index, layer, inputs)
                positions = upper_positions(self.adapter, stage, inputs)
                return self.adapter.write_layer_inputs(
                    args, kwargs, hidden_states=hidden, attention_mask=mask, **positions
                )
        if not stages or stages[-1].keys is None:
            return None
        stage_index = len(stages) - 1
        mask = upper_mask(self.adapter, call, stage_index, layer, inputs)
        positions = upper_positions(self.adapter, stages[stage_index], inputs)
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
        prepare_stage_keys(self.adapter, call, stage_index, stage, inputs)
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
