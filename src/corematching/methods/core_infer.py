"""CoreInfer: decoding with the prompt's sentence-wise core neurons, no token pruning (the neuron half alone).

Wang et al., "CoreInfer: Accelerating Large Language Model Inference with Semantics-Inspired Adaptive Sparse
Activation" (2024). The core neurons of every neuron layer are C_beta over all prompt tokens (selection.py:
token_core_neurons, then sentence_core_neurons); decoding computes only those. It applies to text-only inputs
too, so plain language models can use it.
"""

from dataclasses import dataclass

import torch

from ..selection import sentence_core_neurons, token_core_neurons
from . import defaults
from .base import SparsityMethod, check_layer_list, check_ratio


@dataclass
class CoreInfer(SparsityMethod):
    """beta: share of the FFN width kept per neuron layer; rho: token-wise core ratio; neuron_layers: layers that
    decode with core neurons (None: every layer)."""

    beta: float = defaults.BETA
    rho: float = defaults.RHO
    neuron_layers: list[int] | None = None

    def __post_init__(self):
        check_ratio("beta", self.beta)
        check_ratio("rho", self.rho)
        check_layer_list("neuron_layers", self.neuron_layers)

    def applies_to_text(self) -> bool:
        return True

    def neuron_layer_indices(self, num_layers: int) -> tuple[int, ...]:
        if self.neuron_layers is None:
            return tuple(range(num_layers))
        return check_layer_list("neuron_layers", self.neuron_layers)

    def check_layers(self, num_layers: int) -> None:
        outside = [layer for layer in self.neuron_layer_indices(num_layers) if layer >= num_layers]
        if outside:
            raise ValueError(f"neuron_layers {outside} are out of range: the language model has {num_layers} layers")

    def select_neurons(self, activations: torch.Tensor, token_mask: torch.Tensor, layer: int) -> torch.Tensor:
        token_core = token_core_neurons(activations, self.rho)
        return sentence_core_neurons(token_core, activations, token_mask, self.beta)
