"""The engine: carries a method's decisions out inside the model's own forward passes.

Every call of the adapter's entry module is classified once, at its start, by the KV cache it brings:
  fresh    no past tokens (no cache, or an empty one): with images (or with a method that also applies to text)
           the method chooses tokens after the prune layer K and core neurons; layers > K run on the kept
           tokens only, packed per sample; FFNs run densely. A method with several prune stages (K1 < K2 < ...)
           chooses again after each, among the tokens the previous stage kept. The decisions are attached to the
           cache the call fills (cache_state.py). A row packing several prompts (positions restarting, no mask,
           no cache) keeps each prompt's block in the masks after K (packing.py); assisted decoding's first call,
           the prompt then candidates, decides on the prompt and computes the candidates as decode steps
           (assisted.py).
  extend   past tokens in a cache this session filled: its state says which tokens each stage's layers hold.
           The new tokens (one decode step, several verified tokens, or a whole new turn) attend to those plus
           each other; the FFNs of the neuron layers compute only the prefill's core neurons for them. A new
           turn that brings images has its own visual tokens chosen the same way, among the new tokens.
  dense    anything else (no image, a cache filled outside any session): the model runs untouched.
Hooks call in here: `on_entry` / `on_entry_done` around the entry module, `on_layer` before each decoder layer
after K, `ffn_forward` in place of the FFN forward of the watched layers.
"""

import threading
import weakref
from dataclasses import dataclass, field
from enum import Enum

import torch
from transformers.cache_utils import BaseQuantizedLayer

from ..errors import UnsupportedModeError
from ..methods import SparsityMethod, TokenBatch
from ..models import EntryCall, FFNParts, ImageLayout, ModelAdapter
from .assisted import AssistedPrompt
from .cache_state import (
    CacheState,
    NeuronDecision,
    SessionToken,
    StageSlots,
    attach_state,
    detach_state,
    state_of,
)
from .conversation import ConversationKeeper
from .ffn import SlicedFFN, dense_ffn, masked_ffn, sliced_bytes_estimate
from .masks import padding_mask_from_4d, upper_attention_mask
from .method_inputs import MethodInputs
from .neuron_order import NeuronOrder, prefix_ffn
from .offload import is_offloaded
from .packing import PackedLayout, pack_kept_tokens, packed_sequence_ids
from .records import SparsityRecord


class CallKind(Enum):
    DENSE = "dense"
    FRESH = "fresh"
    EXTEND = "extend"


@dataclass
class StageCall:
    """One prune stage of a call: the call's new tokens its layers (after the stage's layer) see."""

    layout: PackedLayout | None  # the new tokens kept so far, indexed in the call (None: all of them, in place)
    keys: tuple | None = None  # (key index [B, K], key valid [B, K], all valid, new tokens' image [B, q'])
    inputs: dict = field(default_factory=dict)  # position ids gathered at the kept tokens
    embeddings: list = field(default_factory=list)  # [(position embeddings some layer got, them gathered)]
    masks: dict = field(default_factory=dict)  # attention rule -> mask of this stage's layers with that rule
    hidden_index: torch.Tensor | None = None  # [B, L] slots of the previous stage's tokens to gather (None: none)


@dataclass
class CallState:
    """One call of the entry module. Token tensors cover the call's new tokens: [B, q]."""

    kind: CallKind
    entry: EntryCall
    past: int = 0  # tokens already in the cache (full sequence)
    state: CacheState | None = None  # extend: the state of the cache brought in
    valid: torch.Tensor | None = None  # [B, q] bool
    visual: torch.Tensor | None = None  # [B, q] bool
    images: ImageLayout | None = None  # which image each new token belongs to, and its grid
    chooses_tokens: bool = False  # the method picks visual tokens in this call
    prune_activations: torch.Tensor | None = None  # [B, q', F] at the stage's layer, until tokens are chosen
    neurons: dict[int, torch.Tensor] = field(default_factory=dict)  # fresh: core neurons chosen
    neuron_rows: torch.Tensor | None = None  # fresh: [B] bool rows whose neurons are chosen
    keep: torch.Tensor | None = None  # [B, q] bool: new tokens that go past the last stage
    stage_keeps: list = field(default_factory=list)  # per stage chosen in this call: [B, q] bool, past that stage
    scores: torch.Tensor | None = None
    captured: dict = field(default_factory=dict)  # what the method asked for, caught on the way (method_inputs.py)
    merged_hidden: torch.Tensor | None = None  # [B, q', H] new hidden states of kept tokens entering a stage
    stages: list[StageCall] = field(default_factory=list)  # the stages the call has reached so far
    sequences: torch.Tensor | None = None  # [B, q] packed sequence of each new token (None: one per row)
    candidates: torch.Tensor | None = None  # [B, q] bool: assisted decoding's unverified candidates (None: none)

    @property
    def layout(self) -> PackedLayout | None:
        """The new tokens the current layers see (None: all of them, in place)."""
        return self.stages[-1].layout if self.stages else None

    @property
    def current_valid(self) -> torch.Tensor:
        """[B, q'] bool: real tokens among those the current layers see."""
        layout = self.layout
        return self.valid if layout is None else layout.slot_valid

    @property
    def decision_valid(self) -> torch.Tensor:
        """[B, q'] bool: the real tokens the method decides on among those the current layers see: all but
        assisted decoding's candidates, which are decoded, not prefilled."""
        if self.candidates is None:
            return self.current_valid
        layout = self.layout
        candidates = self.candidates if layout is None else self.candidates.gather(1, layout.source_index)
        return self.current_valid & ~candidates


class Engine:
    def __init__(
        self, adapter: ModelAdapter, method: SparsityMethod, token: SessionToken, neuron_weights: str = "copy"
    ):
        self.adapter = adapter
        self.method = method
        self.token = token
        num_layers = adapter.num_layers
        self.stage_layers = tuple(method.prune_stage_layers())
        self.prune_layer = self.stage_layers[0] if self.stage_layers else None  # the first stage's
        self._stage_starting = {layer + 1: stage for stage, layer in enumerate(self.stage_layers)}
        self.neuron_layers = frozenset(method.neuron_layer_indices(num_layers))
        self.decode_ffn_layers = frozenset(method.decode_ffn_layers(num_layers))  # FFNs the method computes
        self.watched_layers = set(self.neuron_layers) | self.decode_ffn_layers
        if method.wants_prune_activations():
            self.watched_layers.update(self.stage_layers)
        self.upper_layers = range(self.prune_layer + 1, num_layers) if self.prune_layer is not None else range(0)
        self.changes_model = self.prune_layer is not None or bool(self.neuron_layers) or bool(self.decode_ffn_layers)
        self._running = threading.local()  # the call in progress is the calling thread's (see `call`)
        self.inputs = MethodInputs(adapter, method, self.stage_layers, lambda: self.call)
        self.call = None
        self.calibrating = False  # the running prefill calibrates the method (Session.calibrate)
        self.last: SparsityRecord | None = None
        # id(decision) -> (weak reference to it, {layer: SlicedFFN or None}): the core-neuron FFNs of a prefill's
        # decision, built at its first decode step; the entry goes when the decision does, that is with the last
        # KV cache (or copy of one) that holds it
        self._sliced: dict[int, tuple[weakref.ref, dict]] = {}
        # neuron_weights="in_place": the layers whose FFN neurons are reordered for a decision (neuron_order.py)
        self.neuron_order = NeuronOrder() if neuron_weights == "in_place" else None
        self.conversation = ConversationKeeper(adapter)  # the model's state between calls travels with caches
        self.assisted = AssistedPrompt()  # an assisted generate()'s prompt, until its first call (assisted.py)
        # FFN weights offloaded by accelerate: core slices are read from the store right after each prefill, and
        # only the latest decision's stay resident
        self.offloaded_ffns = any(is_offloaded(adapter.ffn(layer)) for layer in self.neuron_layers)
        if self.offloaded_ffns and self.neuron_order is not None:
            raise UnsupportedModeError(
                "neuron_weights='in_place' on offloaded FFN weights (meta device): there is no resident tensor to "
                "reorder; use neuron_weights='copy', which reads the core slices from the offload store"
            )

    def model_replacements(self) -> list[tuple[object, str, object]]:
        """(owner, method name, wrapper) the session installs on the model: where generate() reads the state a
        conversation keeps on the model, and per-token inputs added between decoder layers (to the kept tokens)."""
        return self.conversation.replacements() + self.adapter.between_layer_wrappers(self._held_tokens)

    def _held_tokens(self) -> tuple | None:
        """(index [B, L] in the call, valid [B, L]) of the call's tokens the current layers hold; None: all."""
        layout = self.call.layout if self.call is not None else None
        return None if layout is None else (layout.source_index, layout.slot_valid)

    @property
    def call(self) -> CallState | None:
        """The entry call the calling thread is inside (None: none). Per thread, so that hooks run by another
        thread (a vision tower encoding images before its own call) never see it; calls themselves are serialized
        by the session."""
        return getattr(self._running, "call", None)

    @call.setter
    def call(self, value: CallState | None) -> None:
        self._running.call = value

    def reset(self) -> None:
        """Drop decisions and sliced weights; FFN neurons back in their original order."""
        self.call = None
        if self.neuron_order is not None:
            self.neuron_order.restore_all()
        self._sliced.clear()

    # ------------------------------------------------------------------------------------------ entry calls

    def on_entry(self, args: tuple, kwargs: dict) -> None:
        self.call = None
        if torch.compiler.is_compiling():
            raise UnsupportedModeError(
                "torch.compile: a sparsified model changes its shapes with the tokens it keeps; run it uncompiled "
                "(generate(..., disable_compile=True) when a static cache would trigger compilation)"
            )
        entry = self.adapter.read_entry_call(args, kwargs)
        if entry.input_ids is None and entry.inputs_embeds is None:
            return  # the model raises its own error
        state = state_of(entry.cache)
        if state is not None and state.owner is not self.token:
            raise UnsupportedModeError(
                f"this KV cache was filled under another corematching session ({state.owner.description}); "
                "continue it inside that session"
            )
        past = _cache_length(entry.cache, 0)
        if past == 0:
            detach_state(entry.cache)
            state = None
        elif state is not None and state.length != past:
            raise UnsupportedModeError(
                f"the KV cache holds {past} tokens but its sparsified prefill recorded {state.length}: it was "
                "changed outside the session"
            )
        self.conversation.enter(entry.cache, past, entry.batch_size)
        self.adapter.check_attention()
        mask = entry.attention_mask
        if isinstance(mask, dict) and "full_attention" in mask:
            # one mask per layer type, built outside the model for a static cache; the global layers' mask holds
            # the padding (None: causal without padding), over positions only while their first layer's cache
            # holds every token
            if state is not None and state.removed_tokens and self._first_global_layer() > self.prune_layer:
                raise UnsupportedModeError(
                    "a 4-D attention mask per layer type built over this KV cache, whose global-attention layers "
                    "hold only the kept tokens: its columns are cache slots, not positions; pass the 2-D padding "
                    "mask (generate() does under a session)"
                )
            mask = entry.attention_mask = mask["full_attention"]
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            padding = padding_mask_from_4d(mask, past, entry.length) if isinstance(mask, torch.Tensor) else None
            if padding is None:
                applies = entry.image_inputs is not None or self.method.applies_to_text()
                if state is not None or (applies and self.changes_model):
                    raise UnsupportedModeError(
                        "a custom 4-D attention mask: the session builds the masks of the layers after the prune "
                        "layer itself; pass a 2-D padding mask"
                    )
                return
            entry.attention_mask = padding  # a causal padding mask, as generate() builds for static caches
        call = self._new_call(entry, past, state)
        if call.kind == CallKind.DENSE:
            if past == 0:
                self.last = SparsityRecord(type(self.method).__name__, None, call.valid, call.visual)
            return
        self.call = call

    def _first_global_layer(self) -> int:
        """The first decoder layer without a sliding window (the number of layers when every layer slides)."""
        layers = range(self.adapter.num_layers)
        return next((layer for layer in layers if self.adapter.attention_rule(layer).sliding_window is None),
                    self.adapter.num_layers)

    def on_entry_done(self, output) -> None:
        call, self.call = self.call, None
        self.conversation.leave(self.adapter.output_cache(output))
        if call is None:
            return
        cache = call.entry.cache if call.entry.cache is not None else self.adapter.output_cache(output)
        if cache is not None:
            self._update_cache_state(call, cache)
        if call.kind == CallKind.FRESH or call.chooses_tokens:
            self.last = self._record(call)
            decision = state_of(cache).decision if cache is not None and state_of(cache) is not None else None
            if self.offloaded_ffns and call.kind == CallKind.FRESH and decision is not None:
                self._read_offloaded_slices(decision)

    def _read_offloaded_slices(self, decision: NeuronDecision) -> None:
        """Offloaded FFNs: read every neuron layer's core slices now (dropping the previous decision's), and
        report their resident bytes and the bytes read in `last`."""
        self._sliced.clear()
        sliced = [self._sliced_ffn(decision, layer, self.adapter.ffn(layer)) for layer in sorted(decision.neurons)]
        self.last.resident_slice_bytes = sum(ffn.extra_bytes for ffn in sliced if ffn is not None)
        self.last.slice_bytes_read = sum(ffn.bytes_read for ffn in sliced if ffn is not None)

    def _new_call(self, entry: EntryCall, past: int, state: CacheState | None) -> CallState:
        device = entry.device
        batch, length = entry.batch_size, entry.length
        if entry.attention_mask is not None:
            valid = entry.attention_mask[:, -length:].to(device=device, dtype=torch.bool)
        else:
            valid = torch.ones(batch, length, dtype=torch.bool, device=device)
        visual = self.adapter.visual_mask(entry) & valid
        has_images = entry.image_inputs is not None
        if not has_images:
            visual = torch.zeros_like(visual)
        applies = has_images or self.method.applies_to_text()
        call = CallState(
            kind=CallKind.DENSE,
            entry=entry,
            past=past,
            state=state,
            valid=valid,
            visual=visual,
            images=self.adapter.image_layout(entry, visual) if has_images else None,
        )
        prunes = self.prune_layer is not None
        if past == 0:
            if applies and self.changes_model:
                call.kind = CallKind.FRESH
                call.chooses_tokens = prunes and has_images
                call.candidates = self.assisted.candidates(entry.input_ids)
            return call
        if state is None:
            if has_images and prunes:  # a dense cache gets a new image: its tokens are chosen from here on
                call.kind = CallKind.EXTEND
                call.chooses_tokens = True
            return call
        if state.decision_rows is not None and state.decision_rows.shape[0] != batch:
            raise UnsupportedModeError(
                f"the batch has {batch} rows but the KV cache {state.decision_rows.shape[0]}: change the batch "
                "through the cache (reorder_cache, batch_select_indices), not by passing other rows"
            )
        call.kind = CallKind.EXTEND
        call.chooses_tokens = has_images and prunes
        return call

    def _update_cache_state(self, call: CallState, cache) -> None:
        """Record in the cache what this call added: its length and the slots of the layers after K."""
        past, length = call.past, call.valid.shape[1]
        state = call.state
        if call.kind == CallKind.FRESH:
            decision = None
            sparse_rows = call.neuron_rows
            # no decision when no row decodes with core neurons (no row has a visual token that is not padding):
            # every row decodes dense, and an empty union of core neurons is never sliced
            if call.neurons and bool(sparse_rows.any()):
                decision = NeuronDecision(dict(call.neurons), sparse_rows, all_sparse=bool(sparse_rows.all()))
            rows = torch.arange(call.valid.shape[0], device=call.valid.device)
            state = CacheState(self.token, 0, decision=decision, decision_rows=rows if decision is not None else None)
        elif state is None:  # a dense cache extended with chosen tokens
            state = CacheState(self.token, past)
        if state.removed_tokens or any(stage.layout is not None for stage in call.stages):
            state.stages = self._stage_slots_after(call, state)
        state.length = past + length
        attach_state(cache, state, self.stage_layers)

    def _stage_slots_after(self, call: CallState, state: CacheState) -> list[StageSlots]:
        """Each stage's slots once this call's tokens are added: the cached ones, then the call's kept ones."""
        past, device = call.past, call.valid.device
        if state.removed_tokens:
            cached = state.stages
        else:
            index, valid = self._dense_slots(call)
            cached = [StageSlots(index, valid, bool(valid.all()))] * len(self.stage_layers)
        in_place = None  # the call's tokens, every one in place (a stage that removed none of them)
        slots = []
        for old, stage in zip(cached, call.stages):
            if stage.layout is not None:
                layout = stage.layout
                new = StageSlots(layout.source_index + past, layout.slot_valid, layout.all_valid)
            else:
                if in_place is None:
                    all_valid = call.entry.attention_mask is None or bool(call.valid.all())  # one check per call
                    index = torch.arange(past, past + call.valid.shape[1], device=device).expand_as(call.valid)
                    in_place = StageSlots(index, call.valid, all_valid)
                new = in_place
            slots.append(
                StageSlots(
                    torch.cat([old.index, new.index], dim=1),
                    torch.cat([old.valid, new.valid], dim=1),
                    old.all_valid and new.all_valid,
                )
            )
        return slots

    def _dense_slots(self, call: CallState) -> tuple[torch.Tensor, torch.Tensor]:
        """The slots of a cache whose past tokens all went through every layer: [B, past] index and validity."""
        batch, past, device = call.valid.shape[0], call.past, call.valid.device
        index = torch.arange(past, device=device).expand(batch, past)
        mask = call.entry.attention_mask
        if mask is None:
            return index, torch.ones_like(index, dtype=torch.bool)
        return index, mask[:, :past].to(device=device, dtype=torch.bool)

    def _record(self, call: CallState) -> SparsityRecord:
        keep = call.keep if call.keep is not None else call.valid
        chose = call.chooses_tokens and bool(call.stage_keeps)
        return SparsityRecord(
            method=type(self.method).__name__,
            prune_layer=self.prune_layer if chose else None,
            keep_mask=keep,
            stage_keep_masks=dict(zip(self.stage_layers, call.stage_keeps)) if chose else {},
            visual_mask=call.visual,
            neurons=dict(call.neurons),
            token_scores=call.scores,
            neuron_rows=call.neuron_rows,
        )

    # ------------------------------------------------------------------------------------------ decoder layers

    def on_layer(self, layer: int, args: tuple, kwargs: dict):
        """Pre-hook of decoder layer `layer` > K: returns the rewritten (args, kwargs), or None."""
        call = self.call
        if call is None:
            return None
        inputs = self.adapter.read_layer_inputs(args, kwargs)
        stage_index = self._stage_starting.get(layer)
        if stage_index is not None:
            stage = self._start_stage(call, stage_index, inputs)
            if stage.hidden_index is not None:  # gather the surviving tokens (with the method's merged states)
                source = inputs.hidden_states if call.merged_hidden is None else call.merged_hidden
                call.merged_hidden = None
                hidden = _gather_hidden(source, stage.hidden_index)
                mask = self._upper_mask(call, stage_index, layer, inputs)
                return self.adapter.write_layer_inputs(
                    args, kwargs, hidden_states=hidden, attention_mask=mask, **self._upper_positions(stage, inputs)
                )
        if not call.stages or call.stages[-1].keys is None:
            return None
        stage_index = len(call.stages) - 1
        mask = self._upper_mask(call, stage_index, layer, inputs)
        positions = self._upper_positions(call.stages[stage_index], inputs)
        return self.adapter.write_layer_inputs(args, kwargs, attention_mask=mask, **positions)

    def _start_stage(self, call: CallState, stage_index: int, inputs) -> StageCall:
        """At the entry of the layer after stage `stage_index`'s layer: choose its tokens (when the call chooses
        tokens) among those the previous stage kept, and prepare what its layers attend to."""
        previous = call.layout
        stage = StageCall(layout=previous)
        if stage_index == 0:
            call.sequences = self._packed_sequences(call, inputs)
        if call.chooses_tokens:
            chosen = self._choose_tokens(call, stage_index, inputs.hidden_states)  # over the current slots
            stage.hidden_index = chosen.source_index
            if previous is None:
                stage.layout = chosen
            else:
                source = previous.source_index.gather(1, chosen.source_index)
                stage.layout = PackedLayout(source, chosen.slot_valid, chosen.all_valid)
        call.stages.append(stage)
        self._prepare_stage_keys(call, stage_index, stage, inputs)
        return stage

    def _packed_sequences(self, call: CallState, inputs) -> torch.Tensor | None:
        """[B, q]: the packed sequence of each of the call's tokens when the model's own masks keep several prompts
        of a row apart (positions restarting, and neither a 2-D attention mask nor a cache: transformers' rule,
        runtime/packing.py); None otherwise. The masks after the prune layer then keep each prompt in its block."""
        if call.past or call.entry.attention_mask is not None or inputs.cache is not None:
            return None
        sequences = packed_sequence_ids(inputs.position_ids, call.valid.shape[0])
        if sequences is None:
            return None
        mode = "packed sequences (several prompts in one row, position ids restarting at each, no attention mask)"
        if "last_attention" in self.inputs.wanted:
            raise UnsupportedModeError(
                f"{mode} with {type(self.method).__name__}, which reads the last token's attention row over the "
                "whole row; pass one prompt per row"
            )
        if any(self.adapter.attention_rule(layer).bidirectional_images for layer in self.upper_layers):
            raise UnsupportedModeError(
                f"{mode} with images attended both ways ({self.adapter.family}): transformers composes the image "
                "blocks with packed positions in a way the session does not reproduce; pass one prompt per row"
            )
        return sequences

    def _choose_tokens(self, call: CallState, stage_index: int, hidden_states: torch.Tensor) -> PackedLayout:
        """hidden_states [B, q', H]: the input of the layer after the stage's layer, over the tokens the previous
        stage kept (all of the call's at the first stage). Returns the layout of the kept ones among those."""
        images, previous = call.images, call.layout
        batch = TokenBatch(
            valid_mask=call.valid,
            visual_mask=call.visual,
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
        batch.activations, batch.stage = call.prune_activations, stage_index
        self.inputs.fill(batch, call, hidden_states)
        with torch.no_grad():
            both = stage_index == 0 and call.kind == CallKind.FRESH and self.prune_layer in self.neuron_layers
            if both and batch.activations is not None and self.prune_layer not in call.neurons:
                decision, call.neurons[self.prune_layer] = self.method.select_tokens_and_neurons(
                    batch, call.decision_valid, self.prune_layer
                )
            else:
                decision = self.method.select_tokens(batch)
        call.prune_activations = None
        visual = batch.visual_mask
        keep = batch.valid_mask & (~visual | (decision.keep_visual & visual))  # over the current slots
        if call.candidates is not None:
            keep |= call.current_valid & ~batch.valid_mask  # the candidates go on
        call.keep = keep if previous is None else _on_call_tokens(keep, previous, call.valid.shape[1])
        call.stage_keeps.append(call.keep)
        if stage_index == 0:
            call.scores = decision.scores
        if decision.merged_hidden is not None:
            if decision.merged_hidden.shape != hidden_states.shape:
                layer = self.stage_layers[stage_index] + 1
                raise ValueError(
                    f"{type(self.method).__name__}: merged_hidden has shape {tuple(decision.merged_hidden.shape)}, "
                    f"the hidden states entering layer {layer} {tuple(hidden_states.shape)}"
                )
            call.merged_hidden = decision.merged_hidden.to(hidden_states.dtype)
        return pack_kept_tokens(keep)

    def _prepare_stage_keys(self, call: CallState, stage_index: int, stage: StageCall, inputs) -> None:
        """The keys the stage's layers attend to in this call (cached slots, then the call's kept tokens), and
        the gathered positions of the kept tokens."""
        state = call.state
        removed_before = state is not None and state.removed_tokens
        if stage.layout is None and not removed_before:
            return  # nothing removed so far: these layers run as in the dense model
        if removed_before:
            cached = state.stages[stage_index]
            cached_index, cached_valid, all_cached_valid = cached.index, cached.valid, cached.all_valid
        else:  # a dense cache, or none: only a 2-D mask can mark a slot invalid
            cached_index, cached_valid = self._dense_slots(call)
            all_cached_valid = call.past == 0 or call.entry.attention_mask is None
        length = call.valid.shape[1]
        layout = stage.layout
        if layout is not None:
            new_index, new_valid, all_new_valid = layout.source_index, layout.slot_valid, layout.all_valid
        else:
            new_index = torch.arange(length, device=call.valid.device).expand_as(call.valid)
            new_valid, all_new_valid = call.valid, call.entry.attention_mask is None
        new_group = call.images.image_index.gather(1, new_index) if call.images is not None else None
        stage.keys = (
            torch.cat([cached_index, new_index + call.past], dim=1),
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

    def _upper_mask(self, call: CallState, stage_index: int, layer: int, inputs):
        """The attention mask of layer `layer` (of stage `stage_index`) for this call, built once for the stage's
        layers with the same rule (their caches hold the same slots, so they see the same key window)."""
        stage = call.stages[stage_index]
        rule = self.adapter.attention_rule(layer)
        if rule not in stage.masks:
            key_index, key_valid, all_valid, new_group = stage.keys
            num_queries = key_index.shape[1] - _cached_slots(call, stage_index)
            offset, mask_length = self._key_window(call, inputs.cache, layer, num_queries, key_index.shape[1])
            # packed rows come without a cache: the keys are the call's own tokens
            key_sequence = None if call.sequences is None else call.sequences.gather(1, key_index[:, offset:])
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

    def _key_window(self, call: CallState, cache, layer: int, num_queries: int, num_keys: int) -> tuple[int, int]:
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

    # ------------------------------------------------------------------------------------------ FFNs

    def ffn_forward(self, layer: int, parts: FFNParts, hidden: torch.Tensor) -> torch.Tensor:
        call = self.call
        order = self.neuron_order
        if order is not None and order.reordered(layer) and not self._decodes_in_order(call, layer):
            order.restore(layer)  # every use but the decision's own decode steps sees the original neurons
        if call is None:
            return dense_ffn(parts, hidden)[0]
        if call.kind == CallKind.FRESH:
            out, activation = dense_ffn(parts, hidden)
            if self.calibrating and layer in self.decode_ffn_layers:  # Session.calibrate's prefill
                with torch.no_grad():
                    self.method.calibrate_ffn(layer, parts, hidden, call.decision_valid)
            self._observe(call, layer, activation)
            if call.candidates is not None:
                out = self._candidates_decoded(call, layer, parts, hidden, out)
            return out
        decision = call.state.decision if call.state is not None else None
        uses_core = decision is not None and layer in decision.neurons
        if self._wants_prune_activation(call, layer):
            if uses_core:
                rows = call.state.decision_rows
                out, activation = masked_ffn(parts, hidden, decision.neurons[layer][rows], decision.sparse_rows[rows])
            else:
                out, activation = dense_ffn(parts, hidden)
            call.prune_activations = activation.detach()
            return out
        if layer in self.decode_ffn_layers and call.state is not None:
            return self.method.decode_ffn(layer, parts, hidden)
        if not uses_core:
            return dense_ffn(parts, hidden)[0]
        sliced = self._sliced_ffn(decision, layer, parts)
        if sliced is None:  # every neuron is core
            return dense_ffn(parts, hidden)[0]
        rows = call.state.decision_rows
        out = sliced(hidden, rows)
        if decision.all_sparse:
            return out
        # Samples without visual tokens run dense, as they would alone (in place: on the reordered neurons, the
        # same function).
        return torch.where(decision.sparse_rows[rows].view(-1, 1, 1), out, dense_ffn(parts, hidden)[0])

    def _wants_prune_activation(self, call: CallState, layer: int) -> bool:
        """An extend call that chooses tokens needs a prune stage layer's activations (the FFN computed masked)."""
        return call.chooses_tokens and layer in self.stage_layers and call.prune_activations is None

    def _decodes_in_order(self, call: CallState | None, layer: int) -> bool:
        """In place: whether this FFN call decodes with the decision the layer's neurons are arranged for."""
        return (
            call is not None
            and call.kind == CallKind.EXTEND
            and call.state is not None
            and self.neuron_order.holds(layer, call.state.decision)
            and not self._wants_prune_activation(call, layer)
        )

    def _observe(self, call: CallState, layer: int, activation: torch.Tensor) -> None:
        """Fresh prefill: keep the prune layer's activations, and choose the core neurons of neuron layers."""
        activation = activation.detach()
        if call.chooses_tokens and layer in self.stage_layers and self.method.wants_prune_activations():
            call.prune_activations = activation
            if layer == self.prune_layer and layer in self.neuron_layers and call.candidates is None:
                call.neuron_rows = self._neuron_rows(call)
                return  # its neurons are chosen together with the first stage's tokens
        if layer in self.neuron_layers:
            with torch.no_grad():
                call.neurons[layer] = self.method.select_neurons(activation, call.decision_valid, layer)
            call.neuron_rows = self._neuron_rows(call)

    def _candidates_decoded(self, call: CallState, layer: int, parts: FFNParts, hidden, out) -> torch.Tensor:
        """A fresh call's FFN output out [B, q', H] with assisted decoding's candidates computed as decode steps
        compute them: the method's decode FFN, or the core neurons just chosen (rows that decode with them)."""
        if layer in self.decode_ffn_layers:
            decoded = self.method.decode_ffn(layer, parts, hidden)
        elif layer in call.neurons and bool(call.neuron_rows.any()):
            decoded = masked_ffn(parts, hidden, call.neurons[layer], call.neuron_rows)[0]
        else:
            return out
        layout = call.layout
        candidates = call.candidates if layout is None else call.candidates.gather(1, layout.source_index)
        return torch.where(candidates.unsqueeze(-1), decoded, out)

    def _neuron_rows(self, call: CallState) -> torch.Tensor:
        """Rows that decode with core neurons: those with visual tokens (every row for a method that applies to
        text)."""
        if self.method.applies_to_text():
            return torch.ones_like(call.visual[:, 0])
        return call.visual.any(1)

    def sliced_bytes(self) -> int:
        """Bytes held beside the model's weights for core-neuron decoding: the sliced FFNs of the decisions whose
        caches are alive (gathered weights, row masks, swap indices), and the swap indices of layers still in
        another neuron order (in place)."""
        swaps = {} if self.neuron_order is None else self.neuron_order.swaps()
        total = 0
        for _, per_layer in list(self._sliced.values()):
            for sliced in list(per_layer.values()):
                if sliced is not None:
                    total += sliced.extra_bytes
                    swaps.pop(id(sliced.swap), None)  # counted with its FFN
        return total + sum(swap.nbytes for swap in swaps.values())

    def decision_bytes(self, decision: NeuronDecision | None) -> int:
        """Bytes the sliced FFNs of one decision hold beside the model's weights: those built, and an exact estimate
        for the layers its decode steps have not built yet (they are built at the first one)."""
        if decision is None:
            return 0
        entry = self._sliced.get(id(decision))
        built = entry[1] if entry is not None and entry[0]() is decision else {}
        total = 0
        for layer, neurons in decision.neurons.items():
            if layer in built:
                total += 0 if built[layer] is None else built[layer].extra_bytes
            else:
                parts = self.adapter.ffn(layer)
                total += sliced_bytes_estimate(parts, neurons, decision.sparse_rows, self.neuron_order is None)
        return total

    def _sliced_ffn(self, decision: NeuronDecision, layer: int, parts: FFNParts) -> SlicedFFN | None:
        """The layer's core-neuron FFN for a prefill's decision, built on first use (None: all neurons): a gathered
        copy, or in place, views of the model's tensors with the union's neurons moved first."""
        key = id(decision)
        entry = self._sliced.get(key)
        if entry is None or entry[0]() is not decision:
            entry = (weakref.ref(decision, _forget_entry(self._sliced, key)), {})
            if self.offloaded_ffns:  # offloaded FFNs: only the latest decision's slices stay resident
                self._sliced.clear()
            self._sliced[key] = entry
        per_layer = entry[1]
        if layer not in per_layer:
            build = SlicedFFN.gather if self.neuron_order is None else prefix_ffn
            per_layer[layer] = build(parts, decision.neurons[layer], decision.sparse_rows)
        sliced = per_layer[layer]
        if sliced is not None and sliced.swap is not None:
            self.neuron_order.arrange(layer, parts, decision, sliced.swap)
        return sliced


def _forget_entry(sliced: dict, key: int):
    """The callback of a decision's weak reference: drop its sliced FFNs from `sliced` when it goes."""

    def forget(reference: weakref.ref) -> None:
        entry = sliced.get(key)
        if entry is not None and entry[0] is reference:
            sliced.pop(key, None)

    return forget


def _cache_length(cache, layer: int) -> int:
    if cache is None:
        return 0
    layers = getattr(cache, "layers", None)
    if layers is not None and layer >= len(layers):
        return 0
    return int(cache.get_seq_length(layer))


def _cached_slots(call: CallState, stage_index: int) -> int:
    """Slots the layers of a stage held before this call."""
    state = call.state
    if state is not None and state.removed_tokens:
        return state.stages[stage_index].width
    return call.past


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
