"""Core-neuron decoding without a copy of the weights: the FFN's neurons reordered in place.

Permuting an FFN's neurons consistently (the rows of gate_proj and up_proj and their biases, the columns of
down_proj) leaves its function unchanged. For a decision's union U of core neurons in a layer, the core neurons
at positions >= |U| trade places with the non-core neurons at positions < |U| (as many of each), so that U
occupies the first |U| positions. The sliced FFN is then made of views of the model's own tensors: gate and up
`weight[:|U|]` (contiguous rows) and down `weight[:, :|U|]` (a strided view, which the matmul reads in place).
Nothing stays resident beside the model but the swapped positions (two index vectors); a swap moves its m rows
through two temporaries of m rows (columns for down_proj) of one matrix at a time.

A layer keeps that order only while decode steps of the same decision use it. Any other use of its FFN (a
prefill, a pass-through call, a masked or method-defined FFN, another decision's decode step) restores the identity
order first (Engine.ffn_forward), and so does Session.remove. A swap is its own inverse: restoring repeats it,
which gives back the original tensors bit for bit. That holds only when each moved tensor belongs to its one FFN:
a tensor tied to another layer or module would move with it (check_untied refuses it).
"""

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UnsupportedModeError
from ..models import FFNParts
from .ffn import SlicedFFN, core_union


@dataclass
class Swap:
    """The exchange that brings a union of `size` core neurons first: the core neurons at `outside` (positions
    >= size) trade places with the non-core neurons at `inside` (positions < size), pairwise in sorted order."""

    size: int
    width: int  # the FFN's neurons
    inside: torch.Tensor  # [m] long
    outside: torch.Tensor  # [m] long

    @classmethod
    def for_union(cls, union: torch.Tensor, width: int) -> "Swap":
        """union: sorted neuron indices, on the device of the weights."""
        size = union.numel()
        core_first = torch.zeros(size, dtype=torch.bool, device=union.device)
        core_first[union[union < size]] = True
        inside = (~core_first).nonzero().flatten()
        outside = union[union >= size]
        return cls(size, width, inside, outside)

    def positions(self, neurons: torch.Tensor) -> torch.Tensor:
        """Where each neuron sits once the swap is applied (same shape as neurons)."""
        position = torch.arange(self.width, device=neurons.device)
        position[self.outside.to(neurons.device)] = self.inside.to(neurons.device)
        position[self.inside.to(neurons.device)] = self.outside.to(neurons.device)
        return position[neurons]

    @property
    def nbytes(self) -> int:
        return (self.inside.numel() + self.outside.numel()) * self.inside.element_size()


def prefix_ffn(parts: FFNParts, neurons: torch.Tensor, sparse_rows: torch.Tensor) -> SlicedFFN | None:
    """The core-neuron FFN as views of the first |U| neurons, valid once `NeuronOrder.arrange` has applied its
    swap. neurons [B0, k], sparse_rows [B0] as for SlicedFFN.gather. None when every neuron is core; when the
    union alone is every neuron, the original weights with masks (no swap, no copy)."""
    weight = parts.up.weight
    width = weight.shape[0]
    union = core_union(neurons, sparse_rows)
    if union.numel() == width:
        return SlicedFFN.gather(parts, neurons, sparse_rows)
    swap = Swap.for_union(union.to(weight.device), width)
    size = swap.size
    row_masks = None
    if neurons.shape[0] > 1:  # each row's own neurons, at their positions after the swap
        every = torch.zeros(neurons.shape[0], width, dtype=torch.bool, device=neurons.device)
        every.scatter_(1, swap.positions(neurons), True)
        row_masks = every[:, :size].contiguous()

    def first_rows(linear):
        bias = None if linear.bias is None else linear.bias.detach()[:size]
        return linear.weight.detach()[:size], bias

    up, up_bias = first_rows(parts.up)
    gate, gate_bias = first_rows(parts.gate) if parts.gate is not None else (None, None)
    down = parts.down.weight.detach()[:, :size]
    down_bias = None if parts.down.bias is None else parts.down.bias.detach()
    return SlicedFFN(parts.act, up, down, gate, up_bias, gate_bias, down_bias, row_masks, copied=False, swap=swap)


def _neuron_tensors(parts: FFNParts) -> list[tuple[torch.nn.Parameter, int]]:
    """(parameter, dimension indexed by neuron) of every tensor a neuron permutation moves, each once."""
    found = []
    for linear in (parts.gate, parts.up):
        if linear is not None:
            found.append((linear.weight, 0))
            if linear.bias is not None:
                found.append((linear.bias, 0))
    found.append((parts.down.weight, 1))
    unique = {}
    for tensor, dim in found:
        unique.setdefault(id(tensor), (tensor, dim))  # a tensor shared by two projections moves once
    return list(unique.values())


def check_untied(model: nn.Module, ffns: dict, layer_ffn_modules: dict) -> None:
    """Refuse in-place reordering when a tensor it would move (ffns: {layer: FFNParts}) shares memory with a
    parameter or buffer outside that layer's FFN module, or when the module itself serves another decoder layer
    (layer_ffn_modules: {layer: FFN module} of every layer): reordering one layer would move the other's neurons,
    and the swaps of two layers on one tensor do not undo each other in turn."""
    by_storage: dict[tuple, list] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        by_storage.setdefault(_storage_key(tensor), []).append((name, tensor))
    module_names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        module_names.setdefault(id(module), []).append(name)
    for layer, parts in sorted(ffns.items()):
        for other_layer, module in layer_ffn_modules.items():
            if other_layer != layer and module is parts.module:
                _refuse_tied(layer, "the FFN module", f"decoder layer {other_layer} (the same module)")
        # the module's own names (one per path to it); "" (any name) when it is not found under the model
        prefixes = tuple(f"{name}." if name else "" for name in module_names.get(id(parts.module), [""]))
        for tensor, _ in _neuron_tensors(parts):
            sharing = by_storage.get(_storage_key(tensor), [])
            own = next((name for name, other in sharing if other is tensor and name.startswith(prefixes)), None)
            for name, other in sharing:
                if not (other is tensor and name.startswith(prefixes)):
                    _refuse_tied(layer, own or "an FFN tensor", name)


def _storage_key(tensor: torch.Tensor) -> tuple:
    return tensor.device, tensor.untyped_storage().data_ptr()


def _refuse_tied(layer: int, name: str, other: str):
    raise UnsupportedModeError(
        f'neuron_weights="in_place" with tied FFN weights: in decoder layer {layer}, {name} shares its memory with '
        f"{other}; reordering its neurons in place would move the other's too, and restoring could not undo "
        'interleaved swaps. Use neuron_weights="copy"'
    )


def _exchange(parameter: torch.nn.Parameter, dim: int, swap: Swap) -> None:
    """Swap the slices at swap.inside and swap.outside along dim, in place. Both temporaries are taken before
    anything is written, so the tensor is either untouched or fully swapped."""
    data = parameter.data
    at_inside = data.index_select(dim, swap.inside)
    at_outside = data.index_select(dim, swap.outside)
    data.index_copy_(dim, swap.inside, at_outside)
    data.index_copy_(dim, swap.outside, at_inside)


@dataclass
class _Arranged:
    """A layer whose neurons are out of the identity order."""

    swap: Swap
    decision: weakref.ref  # the decision it is arranged for
    swapped: list = field(default_factory=list)  # (parameter, dim) already swapped, in order
    complete: bool = False


class NeuronOrder:
    """Which layers have their FFN neurons reordered, for which decision; puts them back."""

    def __init__(self):
        self._layers: dict[int, _Arranged] = {}

    def reordered(self, layer: int) -> bool:
        return layer in self._layers

    def holds(self, layer: int, decision) -> bool:
        """Whether the layer is arranged for this decision (its views are valid)."""
        state = self._layers.get(layer)
        return decision is not None and state is not None and state.complete and state.decision() is decision

    def arrange(self, layer: int, parts: FFNParts, decision, swap: Swap) -> None:
        """Put the layer's neurons in the order `swap` defines for `decision` (nothing to do when they are)."""
        if self.holds(layer, decision):
            return
        self.restore(layer)
        state = _Arranged(swap, weakref.ref(decision))
        self._layers[layer] = state
        with torch.no_grad():
            for parameter, dim in _neuron_tensors(parts):
                _exchange(parameter, dim, swap)
                state.swapped.append((parameter, dim))
        state.complete = True

    def restore(self, layer: int) -> None:
        """The identity order again, exactly (a swap undoes itself)."""
        state = self._layers.get(layer)
        if state is None:
            return
        with torch.no_grad():
            while state.swapped:
                parameter, dim = state.swapped[-1]
                _exchange(parameter, dim, state.swap)
                state.swapped.pop()
        del self._layers[layer]

    def swaps(self) -> dict[int, Swap]:
        """id -> swap of each layer out of the identity order (what restoring it needs)."""
        return {id(state.swap): state.swap for state in self._layers.values()}

    def restore_all(self) -> None:
        for layer in list(self._layers):
            self.restore(layer)
