"""The engine: carries a method's decisions out inside the model's own forward passes.

It coordinates three rooms, each a module a newcomer can read on its own:
  call_plan.py      classifies each call of the adapter's entry module once, at its start, into a plan: fresh
                    (the method decides), extend (a cache this session filled: decode steps, verified tokens, a new
                    turn) or dense (the model runs untouched), with its normalised mask and one FFN mode per layer.
  token_removal.py  at the layer after each prune stage, chooses the tokens that go on and rewrites the inputs of
                    the layers after it (packed kept tokens); stage_keys.py gives those layers their keys, masks
                    and positions, and after the call, which tokens each stage's cache slots hold.
  core_decoding.py  runs every watched FFN by the plan's mode: dense, observed (a prefill choosing core neurons),
                    masked, the method's own, or sliced to the prefill's core neurons (and keeps those slices).
A running call is a LiveCall (live_call.py): the plan, and what each room has done in it so far, one part each.
The session's hooks call in here: `on_entry` / `on_entry_done` around the entry module, `on_layer` before each
decoder layer after K, `ffn_forward` in place of the FFN forward of the watched layers. Everything a call decides
travels with the KV cache it fills (cache_state.py): fresh calls attach the decision, extend calls read it.
Packed rows (packing.py) and assisted decoding's first call (assisted.py) are fresh calls with their own rules.
"""

import threading

import torch

from ..errors import UnsupportedModeError
from ..methods import SparsityMethod
from ..models import FFNParts, ModelAdapter
from .assisted import AssistedPrompt
from .cache_state import CacheState, NeuronDecision, SessionToken, attach_state, state_of
from .call_plan import CallClassifier, CallKind, CallPlan, LayerRoles
from .conversation import ConversationKeeper
from .core_decoding import CoreDecoding
from .live_call import LiveCall
from .method_inputs import MethodInputs
from .neuron_order import NeuronOrder
from .offload import is_offloaded
from .records import SparsityRecord
from .stage_keys import stage_slots_after
from .token_removal import TokenRemoval

__all__ = ["CallKind", "CallPlan", "Engine", "LiveCall"]


class Engine:
    def __init__(
        self, adapter: ModelAdapter, method: SparsityMethod, token: SessionToken, neuron_weights: str = "copy"
    ):
        self.adapter = adapter
        self.method = method
        self.token = token
        self.roles = roles = LayerRoles.of(method, adapter.num_layers)
        self.stage_layers = roles.stage_layers
        self.prune_layer = roles.prune_layer  # the first stage's
        self.neuron_layers = roles.neuron_layers
        self.decode_ffn_layers = roles.decode_ffn_layers  # FFNs the method computes
        self.upper_layers = roles.upper_layers
        self.classifier = CallClassifier(adapter, method, roles, token)
        self.watched_layers = self.classifier.watched_layers
        self.changes_model = self.classifier.changes_model
        self._running = threading.local()  # the call in progress is the calling thread's (see `call`)
        self.inputs = MethodInputs(adapter, method, self.stage_layers)
        self.removal = TokenRemoval(adapter, method, roles, self.inputs)
        self.calibrating = False  # the running prefill calibrates the method (Session.calibrate)
        self.last: SparsityRecord | None = None
        # FFN weights offloaded by accelerate: core slices are read from the store right after each prefill, and
        # only the latest decision's stay resident
        offloaded = any(is_offloaded(adapter.ffn(layer)) for layer in self.neuron_layers)
        # neuron_weights="in_place": the layers whose FFN neurons are reordered for a decision (neuron_order.py)
        neuron_order = NeuronOrder() if neuron_weights == "in_place" else None
        if offloaded and neuron_order is not None:
            raise UnsupportedModeError(
                "neuron_weights='in_place' on offloaded FFN weights (meta device): there is no resident tensor to "
                "reorder; use neuron_weights='copy', which reads the core slices from the offload store"
            )
        self.decoding = CoreDecoding(adapter, method, roles, neuron_order, offloaded)
        self.neuron_order = neuron_order
        self.conversation = ConversationKeeper(adapter)  # the model's state between calls travels with caches
        self.assisted = AssistedPrompt()  # an assisted generate()'s prompt, until its first call (assisted.py)

    @property
    def _sliced(self) -> dict:
        """id(decision) -> (weak reference to it, {layer: SlicedFFN or None}): the decisions' core-neuron FFNs."""
        return self.decoding.sliced

    def model_replacements(self) -> list[tuple[object, str, object]]:
        """(owner, method name, wrapper) the session installs on the model: where generate() reads the state a
        conversation keeps on the model, and per-token inputs added between decoder layers (to the kept tokens)."""
        return self.conversation.replacements() + self.adapter.between_layer_wrappers(self._held_tokens)

    def _held_tokens(self) -> tuple | None:
        """(index [B, L] in the call, valid [B, L]) of the call's tokens the current layers hold; None: all."""
        layout = self.call.layout if self.call is not None else None
        return None if layout is None else (layout.source_index, layout.slot_valid)

    @property
    def call(self) -> LiveCall | None:
        """The entry call the calling thread is inside (None: none). Per thread, so that hooks run by another
        thread (a vision tower encoding images before its own call) never see it; calls themselves are serialized
        by the session."""
        return getattr(self._running, "call", None)

    @call.setter
    def call(self, value: LiveCall | None) -> None:
        self._running.call = value
        if value is not None and value.plan.chooses_tokens:
            self.inputs.begin(value)  # the hooks of this thread capture what the method asked for into it
        else:
            self.inputs.end()

    def reset(self) -> None:
        """Drop decisions and sliced weights; FFN neurons back in their original order."""
        self.call = None
        self.decoding.reset()

    # ------------------------------------------------------------------------------------------ entry calls

    def on_entry(self, args: tuple, kwargs: dict) -> None:
        self.call = None
        opened = self.classifier.open(args, kwargs)
        if opened is None:
            return  # the model raises its own error
        entry, past, state = opened
        self.conversation.enter(entry.cache, past, entry.batch_size)
        plan = self.classifier.plan(entry, past, state, self.assisted)
        if plan is None:
            return
        if plan.kind == CallKind.PASS_THROUGH:
            if past == 0:
                self.last = SparsityRecord(type(self.method).__name__, None, plan.valid, plan.visual)
            return
        self.call = LiveCall(plan)

    def on_entry_done(self, output) -> None:
        call = self.call
        self.call = None
        self.conversation.leave(self.adapter.output_cache(output))
        if call is None:
            return
        plan = call.plan
        cache = plan.entry.cache if plan.entry.cache is not None else self.adapter.output_cache(output)
        if cache is not None:
            self._update_cache_state(call, cache)
        if plan.kind == CallKind.FRESH or plan.chooses_tokens:
            self.last = self._record(call)
            decision = state_of(cache).decision if cache is not None and state_of(cache) is not None else None
            if self.decoding.offloaded and plan.kind == CallKind.FRESH and decision is not None:
                resident, read = self.decoding.read_offloaded_slices(decision)
                self.last.resident_slice_bytes, self.last.slice_bytes_read = resident, read

    def _update_cache_state(self, call: LiveCall, cache) -> None:
        """Record in the cache what this call added: its length and the slots of the layers after K."""
        plan = call.plan
        past, length = plan.past, plan.valid.shape[1]
        state = plan.state
        if plan.kind == CallKind.FRESH:
            decision = None
            sparse_rows = call.neurons.rows
            # no decision when no row decodes with core neurons (no row has a visual token that is not padding):
            # every row decodes dense, and an empty union of core neurons is never sliced
            if call.neurons.chosen and bool(sparse_rows.any()):
                decision = NeuronDecision(dict(call.neurons.chosen), sparse_rows, all_sparse=bool(sparse_rows.all()))
            rows = torch.arange(plan.valid.shape[0], device=plan.valid.device)
            state = CacheState(self.token, 0, decision=decision, decision_rows=rows if decision is not None else None)
        elif state is None:  # a dense cache extended with chosen tokens
            state = CacheState(self.token, past)
        if state.removed_tokens or any(stage.layout is not None for stage in call.tokens.stages):
            state.stages = stage_slots_after(call, state, len(self.stage_layers))
        state.length = past + length
        attach_state(cache, state, self.stage_layers)

    def _record(self, call: LiveCall) -> SparsityRecord:
        plan, tokens = call.plan, call.tokens
        keep = tokens.keep if tokens.keep is not None else plan.valid
        chose = plan.chooses_tokens and bool(tokens.stage_keeps)
        return SparsityRecord(
            method=type(self.method).__name__,
            prune_layer=self.prune_layer if chose else None,
            keep_mask=keep,
            stage_keep_masks=dict(zip(self.stage_layers, tokens.stage_keeps)) if chose else {},
            visual_mask=plan.visual,
            neurons=dict(call.neurons.chosen),
            token_scores=tokens.scores,
            neuron_rows=call.neurons.rows,
        )

    # ------------------------------------------------------------------------------------------ layers and FFNs

    def on_layer(self, layer: int, args: tuple, kwargs: dict):
        """Pre-hook of decoder layer `layer` > K: returns the rewritten (args, kwargs), or None."""
        call = self.call
        return None if call is None else self.removal.on_layer(call, layer, args, kwargs)

    def ffn_forward(self, layer: int, parts: FFNParts, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoding.forward(self.call, layer, parts, hidden, self.calibrating)

    def sliced_bytes(self) -> int:
        """Bytes held beside the model's weights for core-neuron decoding (core_decoding.py)."""
        return self.decoding.sliced_bytes()

    def decision_bytes(self, decision: NeuronDecision | None) -> int:
        """Bytes the sliced FFNs of one decision hold beside the model's weights, built or to be built."""
        return self.decoding.decision_bytes(decision)
