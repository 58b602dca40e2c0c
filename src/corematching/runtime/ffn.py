"""The FFN computations: dense (exposing the activation), masked, and core-neuron decoding with sliced weights."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from ..models import FFNParts
from . import offload


def ffn_activation(parts: FFNParts, hidden: torch.Tensor) -> torch.Tensor:
    """a(x): the input of down_proj [..., F]."""
    if parts.gate is None:
        return parts.act(parts.up(hidden))
    return parts.act(parts.gate(hidden)) * parts.up(hidden)


def dense_ffn(parts: FFNParts, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The FFN exactly as the model computes it, and its activation."""
    activation = ffn_activation(parts, hidden)
    return parts.down(activation), activation


def masked_ffn(
    parts: FFNParts, hidden: torch.Tensor, neurons: torch.Tensor, sparse_rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The FFN with each sparse row's activation zeroed outside its neurons [B, k]; other rows dense."""
    activation = ffn_activation(parts, hidden)
    keep = torch.zeros(activation.shape[0], activation.shape[-1], dtype=torch.bool, device=activation.device)
    keep.scatter_(1, neurons.to(activation.device), True)
    keep |= ~sparse_rows.to(activation.device).unsqueeze(1)
    activation = activation * keep.unsqueeze(1).to(activation.dtype)
    return parts.down(activation), activation


def core_union(neurons: torch.Tensor, sparse_rows: torch.Tensor) -> torch.Tensor:
    """The sorted union of the core neurons [B0, k] of the rows that decode with them (sparse_rows [B0])."""
    rows = neurons[sparse_rows.to(neurons.device)]
    return torch.unique(rows) if rows.numel() else neurons[:0, 0]


def sliced_bytes_estimate(parts: FFNParts, neurons: torch.Tensor, sparse_rows: torch.Tensor, copied: bool) -> int:
    """The bytes a layer's SlicedFFN for these core neurons ([B0, k], sparse_rows [B0]) holds beside the model's
    weights once built: with `copied`, the union's rows of gate/up (and their biases) and columns of down, plus a
    batch's row masks; in place, the row masks and the swap's two index vectors (neuron_order.Swap)."""
    width = parts.up.weight.shape[0]
    members = core_union(neurons, sparse_rows)
    union = members.numel()
    if union == width and neurons.shape[1] == width:
        return 0  # every neuron is core: the layer decodes densely
    masks = union * neurons.shape[0] if neurons.shape[0] > 1 or union == width else 0
    if union == width:
        return masks  # the model's own weights, masked
    if not copied:  # the swap moves the members at positions >= |U| (as many non-members come forward)
        return masks + 2 * int((members >= union).sum()) * members.element_size()
    element = parts.up.weight.element_size()
    linears = [linear for linear in (parts.gate, parts.up) if linear is not None]
    rows = sum(linear.weight.shape[1] + (linear.bias is not None) for linear in linears)
    return union * (rows + parts.down.weight.shape[0]) * element + masks


def check_sliceable(parts: FFNParts, layer: int) -> None:
    """Core-neuron decoding gathers rows and columns of plain floating-point weights; anything else (8-bit or
    4-bit modules, tensor-subclass quantization, offloaded weights) is refused by name."""
    for name in ("gate", "up", "down"):
        linear = getattr(parts, name)
        if linear is None:
            continue
        weight = linear.weight
        if type(linear) is not nn.Linear:
            kind = f"a {type(linear).__module__}.{type(linear).__name__} module"
        elif type(weight.data) is not torch.Tensor:
            kind = f"a {type(weight.data).__name__} weight (quantized tensor)"
        elif not weight.dtype.is_floating_point:
            kind = f"a {weight.dtype} weight"
        elif weight.device.type == "meta" and not offload.readable(linear):
            kind = "an offloaded weight (on the meta device) without an accelerate offload store to read slices from"
        else:
            continue
        raise UnsupportedModelError(
            f"decoder layer {layer}: core-neuron decoding slices FFN weights, but its {name} projection is {kind}; "
            "use a method without neuron_layers (token pruning works on any FFN) or unquantized weights"
        )


@dataclass
class SlicedFFN:
    """An FFN restricted to core neurons: act(x W_g[C]ᵀ) * (x W_u[C]ᵀ) W_d[:, C]ᵀ.

    One copy for the whole batch: C is the union U of the samples' core neurons, and each sample's activation is
    masked to its own set (`row_masks`), which equals zeroing it outside that set. So the memory added does not
    grow with the batch (at most one FFN), and a sample's output does not depend on its batch mates.
    gate, up [U, H]; down [H, U]; row_masks [B0, U] (None for one sample, whose set is U).
    """

    act: object
    up: torch.Tensor
    down: torch.Tensor
    gate: torch.Tensor | None
    up_bias: torch.Tensor | None
    gate_bias: torch.Tensor | None
    down_bias: torch.Tensor | None
    row_masks: torch.Tensor | None
    copied: bool = True  # the weights are a gathered copy (False: the model's own tensors)
    swap: object = None  # in place (neuron_order.Swap): the neuron order these views of the model's tensors need
    bytes_read: int = 0  # offloaded weights: bytes read from the offload store to gather this copy

    @classmethod
    def gather(cls, parts: FFNParts, neurons: torch.Tensor, sparse_rows: torch.Tensor) -> "SlicedFFN | None":
        """neurons [B0, k]: sorted core neurons of each prefill row; sparse_rows [B0]: rows that use them.
        None when the union is every neuron (the original weights are used, masked, without a copy)."""
        width = parts.up.weight.shape[0]
        union = core_union(neurons, sparse_rows)
        if union.numel() == width and neurons.shape[1] == width:
            return None
        offloaded = offload.is_offloaded(parts)  # the slices are read from the offload store (offload.py)
        if union.numel() == width and not offloaded:
            return cls._masked_originals(parts, neurons)
        row_masks = None
        if neurons.shape[0] > 1:  # position of each row's neurons inside the union
            in_union = torch.searchsorted(union, neurons)
            row_masks = torch.zeros(neurons.shape[0], union.numel(), dtype=torch.bool, device=neurons.device)
            row_masks.scatter_(1, in_union.clamp(max=union.numel() - 1), True)

        def rows_of(linear):
            weight = linear.weight.detach().index_select(0, union)
            bias = None if linear.bias is None else linear.bias.detach().index_select(0, union)
            return weight, bias

        if offloaded:
            stored = offload.read_core_slices(parts, union)
            return cls(
                parts.act, stored.up, stored.down, stored.gate, stored.up_bias, stored.gate_bias, stored.down_bias,
                row_masks, bytes_read=stored.bytes_read,
            )
        up, up_bias = rows_of(parts.up)
        gate, gate_bias = rows_of(parts.gate) if parts.gate is not None else (None, None)
        down = parts.down.weight.detach().index_select(1, union)
        down_bias = None if parts.down.bias is None else parts.down.bias.detach()
        return cls(parts.act, up, down, gate, up_bias, gate_bias, down_bias, row_masks)

    @classmethod
    def _masked_originals(cls, parts: FFNParts, neurons: torch.Tensor) -> "SlicedFFN":
        """The union covers every neuron: the original weights (no copy) with each row's activation masked."""
        row_masks = torch.zeros(neurons.shape[0], parts.up.weight.shape[0], dtype=torch.bool, device=neurons.device)
        row_masks.scatter_(1, neurons, True)

        def weight_and_bias(linear):
            return linear.weight.detach(), None if linear.bias is None else linear.bias.detach()

        up, up_bias = weight_and_bias(parts.up)
        gate, gate_bias = weight_and_bias(parts.gate) if parts.gate is not None else (None, None)
        down, down_bias = weight_and_bias(parts.down)
        return cls(parts.act, up, down, gate, up_bias, gate_bias, down_bias, row_masks, copied=False)

    @property
    def weight_bytes(self) -> int:
        """Memory of the gathered weights and biases (0 when they are the model's own tensors)."""
        copies = (self.up, self.down, self.gate, self.up_bias, self.gate_bias) if self.copied else ()
        return sum(t.numel() * t.element_size() for t in copies if t is not None)

    @property
    def extra_bytes(self) -> int:
        """Memory this FFN adds beside the model's own weights: gathered weights, row masks, swap indices."""
        masks = 0 if self.row_masks is None else self.row_masks.numel() * self.row_masks.element_size()
        return self.weight_bytes + masks + (0 if self.swap is None else self.swap.nbytes)

    def __call__(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """hidden [B, q, H]; rows [B]: the prefill row each sample follows -> [B, q, H]."""
        up = F.linear(hidden, self.up, self.up_bias)
        if self.gate is None:
            activation = self.act(up)
        else:
            activation = self.act(F.linear(hidden, self.gate, self.gate_bias)) * up
        if self.row_masks is not None:
            activation = activation * self.row_masks[rows].unsqueeze(1).to(activation.dtype)
        return F.linear(activation, self.down, self.down_bias)
