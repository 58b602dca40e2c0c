"""The FFN computations: dense (exposing the activation) and core-neuron decoding with sliced weights."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models import FFNParts


def ffn_activation(parts: FFNParts, hidden: torch.Tensor) -> torch.Tensor:
    """a(x): the input of down_proj [..., F]."""
    if parts.gate is None:
        return parts.act(parts.up(hidden))
    return parts.act(parts.gate(hidden)) * parts.up(hidden)


def dense_ffn(parts: FFNParts, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The FFN exactly as the model computes it, and its activation."""
    activation = ffn_activation(parts, hidden)
    return parts.down(activation), activation


@dataclass
class SlicedFFN:
    """An FFN restricted to each sample's core neurons C: act(x W_g[C]ᵀ) * (x W_u[C]ᵀ) W_d[:, C]ᵀ.

    Weights are gathered once; rows of gate/up and columns of down, per sample:
    gate, up [B, k, H]; down [B, H, k]; biases of gate/up [B, k]; down's bias is not sliced.
    """

    act: object
    up: torch.Tensor
    down: torch.Tensor
    gate: torch.Tensor | None
    up_bias: torch.Tensor | None
    gate_bias: torch.Tensor | None
    down_bias: torch.Tensor | None

    @classmethod
    def gather(cls, parts: FFNParts, neurons: torch.Tensor) -> "SlicedFFN":
        """neurons [B, k]: sorted core neuron indices of each sample."""
        batch, k = neurons.shape
        flat = neurons.reshape(-1)

        def rows(linear):
            weight = linear.weight.detach().index_select(0, flat).view(batch, k, -1)
            bias = None if linear.bias is None else linear.bias.detach().index_select(0, flat).view(batch, k)
            return weight, bias

        up, up_bias = rows(parts.up)
        gate, gate_bias = rows(parts.gate) if parts.gate is not None else (None, None)
        down_weight = parts.down.weight.detach()  # [H, F]
        down = down_weight.index_select(1, flat).view(down_weight.shape[0], batch, k).permute(1, 0, 2).contiguous()
        down_bias = None if parts.down.bias is None else parts.down.bias.detach()
        return cls(parts.act, up, down, gate, up_bias, gate_bias, down_bias)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, q, H] -> [B, q, H]."""
        if self.up.shape[0] == 1:  # one sample: plain matmuls with [k, H] / [H, k] weights
            activation = self._activation_single(hidden)
            return F.linear(activation, self.down[0], self.down_bias)
        activation = self._activation_batched(hidden)
        out = torch.bmm(activation, self.down.transpose(1, 2))  # [B, q, H]
        return out if self.down_bias is None else out + self.down_bias

    def _activation_single(self, hidden):
        def project(weight, bias):
            return F.linear(hidden, weight[0], None if bias is None else bias[0])

        up = project(self.up, self.up_bias)
        if self.gate is None:
            return self.act(up)
        return self.act(project(self.gate, self.gate_bias)) * up

    def _activation_batched(self, hidden):
        def project(weight, bias):
            out = torch.bmm(hidden, weight.transpose(1, 2))  # [B, q, k]
            return out if bias is None else out + bias.unsqueeze(1)

        up = project(self.up, self.up_bias)
        if self.gate is None:
            return self.act(up)
        return self.act(project(self.gate, self.gate_bias)) * up
