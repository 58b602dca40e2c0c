"""Core-neuron decoding: how the FFN of each watched layer runs in a call, by the mode the call's plan fixed.

The plan (call_plan.py) gives every watched layer one `FFNMode` when the call starts; here each FFN call only
looks its mode up:
  DENSE     the FFN as the model computes it (no sparsified call, or a layer with nothing to do in this call).
  OBSERVE   a fresh prefill: the FFN runs densely and its activations are watched: a prune stage layer's are kept
            for the token choice, a neuron layer's give its core neurons. Under assisted decoding the call's
            candidates are computed as decode steps compute them.
  MASKED    a later call that chooses new visual tokens, at a prune stage layer: the prefill's core neurons with
            a mask, so that the activations the method reads are those of the decoding model.
  METHOD    a layer the method decodes itself (`decode_ffn`, e.g. TEAL's thresholds).
  SLICED    a neuron layer of the prefill's decision: the core-neuron FFN, a gathered copy of the core rows, or in
            place (neuron_weights="in_place"), views of the model's tensors with the core neurons moved first.
Sliced FFNs are built at a decision's first decode step and live as long as the decision (that is, the last KV
cache holding it). Offloaded FFN weights (accelerate, meta device) have their core slices read right after the
prefill, and only the latest decision's stay resident.
"""

import weakref
from enum import Enum

import torch

from ..methods import SparsityMethod
from ..models import FFNParts, ModelAdapter
from .cache_state import NeuronDecision
from .ffn import SlicedFFN, dense_ffn, masked_ffn, sliced_bytes_estimate
from .neuron_order import NeuronOrder, prefix_ffn
from .weak_table import forget_when_collected


class FFNMode(Enum):
    DENSE = "dense"
    OBSERVE = "observe"
    MASKED = "masked"
    METHOD = "method"
    SLICED = "sliced"


class CoreDecoding:
    def __init__(self, adapter: ModelAdapter, method: SparsityMethod, roles, neuron_order: NeuronOrder | None,
                 offloaded: bool):
        self.adapter = adapter
        self.method = method
        self.roles = roles  # call_plan.LayerRoles: which layers prune, choose core neurons, decode by the method
        self.neuron_order = neuron_order  # in place: the layers whose neurons are reordered for a decision
        self.offloaded = offloaded
        # id(decision) -> (weak reference to it, {layer: SlicedFFN or None}); the entry goes with the decision
        self.sliced: dict[int, tuple[weakref.ref, dict]] = {}

    def forward(self, call, layer: int, parts: FFNParts, hidden: torch.Tensor, calibrating: bool) -> torch.Tensor:
        """The FFN output of layer `layer` for hidden [B, q', H] in `call` (None: no sparsified call)."""
        mode = FFNMode.DENSE if call is None else call.plan.ffn_modes.get(layer, FFNMode.DENSE)
        order = self.neuron_order
        if order is not None and order.reordered(layer) and not self._decodes_in_order(call, layer, mode):
            order.restore(layer)  # every use but the decision's own decode steps sees the original neurons
        if mode is FFNMode.DENSE:
            return dense_ffn(parts, hidden)[0]
        if mode is FFNMode.OBSERVE:
            return self._observe(call, layer, parts, hidden, calibrating)
        if mode is FFNMode.METHOD:
            return self.method.decode_ffn(layer, parts, hidden)
        state = call.plan.state
        decision = state.decision if state is not None else None
        uses_core = decision is not None and layer in decision.neurons
        if mode is FFNMode.MASKED:
            if uses_core:
                rows = state.decision_rows
                out, activation = masked_ffn(parts, hidden, decision.neurons[layer][rows], decision.sparse_rows[rows])
            else:
                out, activation = dense_ffn(parts, hidden)
            call.tokens.prune_activations = activation.detach()
            return out
        sliced = self.sliced_ffn(decision, layer, parts)
        if sliced is None:  # every neuron is core
            return dense_ffn(parts, hidden)[0]
        rows = state.decision_rows
        out = sliced(hidden, rows)
        if decision.all_sparse:
            return out
        # Samples without visual tokens run dense, as they would alone (in place: on the reordered neurons, the
        # same function).
        return torch.where(decision.sparse_rows[rows].view(-1, 1, 1), out, dense_ffn(parts, hidden)[0])

    def _decodes_in_order(self, call, layer: int, mode: FFNMode) -> bool:
        """In place: whether this FFN call decodes with the decision the layer's neurons are arranged for."""
        return (
            mode in (FFNMode.METHOD, FFNMode.SLICED, FFNMode.DENSE)
            and call is not None
            and call.plan.state is not None
            and self.neuron_order.holds(layer, call.plan.state.decision)
        )

    def _observe(self, call, layer: int, parts: FFNParts, hidden: torch.Tensor, calibrating: bool) -> torch.Tensor:
        """Fresh prefill: the dense FFN; keep a prune stage layer's activations, choose a neuron layer's core
        neurons (the first stage's layer: together with its tokens), and decode assisted decoding's candidates."""
        plan, tokens, neurons, roles = call.plan, call.tokens, call.neurons, self.roles
        out, activation = dense_ffn(parts, hidden)
        if calibrating and layer in roles.decode_ffn_layers:  # Session.calibrate's prefill
            with torch.no_grad():
                self.method.calibrate_ffn(layer, parts, hidden, call.decision_valid)
        activation = activation.detach()
        chosen_with_tokens = False
        if plan.chooses_tokens and layer in roles.stage_layers and self.method.wants_prune_activations():
            tokens.prune_activations = activation
            if layer == roles.prune_layer and layer in roles.neuron_layers and plan.candidates is None:
                neurons.rows = plan.neuron_rows
                chosen_with_tokens = True  # its neurons are chosen together with the first stage's tokens
        if not chosen_with_tokens and layer in roles.neuron_layers:
            with torch.no_grad():
                neurons.chosen[layer] = self.method.select_neurons(activation, call.decision_valid, layer)
            neurons.rows = plan.neuron_rows
        if plan.candidates is not None:
            out = self._candidates_decoded(call, layer, parts, hidden, out)
        return out

    def _candidates_decoded(self, call, layer: int, parts: FFNParts, hidden, out) -> torch.Tensor:
        """A fresh call's FFN output out [B, q', H] with assisted decoding's candidates computed as decode steps
        compute them: the method's decode FFN, or the core neurons just chosen (rows that decode with them)."""
        neurons = call.neurons
        if layer in self.roles.decode_ffn_layers:
            decoded = self.method.decode_ffn(layer, parts, hidden)
        elif layer in neurons.chosen and bool(neurons.rows.any()):
            decoded = masked_ffn(parts, hidden, neurons.chosen[layer], neurons.rows)[0]
        else:
            return out
        return torch.where(call.current(call.plan.candidates).unsqueeze(-1), decoded, out)

    # ------------------------------------------------------------------------------------------ sliced weights

    def sliced_ffn(self, decision: NeuronDecision, layer: int, parts: FFNParts) -> SlicedFFN | None:
        """The layer's core-neuron FFN for a prefill's decision, built on first use (None: all neurons): a gathered
        copy, or in place, views of the model's tensors with the union's neurons moved first."""
        key = id(decision)
        entry = self.sliced.get(key)
        if entry is None or entry[0]() is not decision:
            entry = (weakref.ref(decision, forget_when_collected(self.sliced, key)), {})
            if self.offloaded:  # offloaded FFNs: only the latest decision's slices stay resident
                self.sliced.clear()
            self.sliced[key] = entry
        per_layer = entry[1]
        if layer not in per_layer:
            build = SlicedFFN.gather if self.neuron_order is None else prefix_ffn
            per_layer[layer] = build(parts, decision.neurons[layer], decision.sparse_rows)
        sliced = per_layer[layer]
        if sliced is not None and sliced.swap is not None:
            self.neuron_order.arrange(layer, parts, decision, sliced.swap)
        return sliced

    def read_offloaded_slices(self, decision: NeuronDecision) -> tuple[int, int]:
        """Offloaded FFNs: read every neuron layer's core slices now (dropping the previous decision's). Returns
        (resident bytes, bytes read)."""
        self.sliced.clear()
        sliced = [self.sliced_ffn(decision, layer, self.adapter.ffn(layer)) for layer in sorted(decision.neurons)]
        built = [ffn for ffn in sliced if ffn is not None]
        return sum(ffn.extra_bytes for ffn in built), sum(ffn.bytes_read for ffn in built)

    def reset(self) -> None:
        if self.neuron_order is not None:
            self.neuron_order.restore_all()
        self.sliced.clear()

    def sliced_bytes(self) -> int:
        """Bytes held beside the model's weights for core-neuron decoding: the sliced FFNs of the decisions whose
        caches are alive (gathered weights, row masks, swap indices), and the swap indices of layers still in
        another neuron order (in place)."""
        swaps = {} if self.neuron_order is None else self.neuron_order.swaps()
        total = 0
        for _, per_layer in list(self.sliced.values()):
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
        entry = self.sliced.get(id(decision))
        built = entry[1] if entry is not None and entry[0]() is decision else {}
        total = 0
        for layer, neurons in decision.neurons.items():
            if layer in built:
                total += 0 if built[layer] is None else built[layer].extra_bytes
            else:
                parts = self.adapter.ffn(layer)
                total += sliced_bytes_estimate(parts, neurons, decision.sparse_rows, self.neuron_order is None)
        return total
