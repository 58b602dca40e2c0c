"""compose: one token method and one neuron method in a single session."""

from dataclasses import dataclass

import torch

from .base import SparsityMethod, TokenBatch, TokenDecision


@dataclass
class Composed(SparsityMethod):
    """Tokens chosen by `token_method` (its prune layer and inputs), neurons by `neuron_method` (its core neurons
    or its own decode FFN). Text-only inputs get the neuron method alone when it applies to text."""

    token_method: SparsityMethod
    neuron_method: SparsityMethod

    def __post_init__(self):
        for name in ("token_method", "neuron_method"):
            if not isinstance(getattr(self, name), SparsityMethod):
                raise ValueError(f"{name} must be a corematching method, got {getattr(self, name)!r}")
        if self.token_method.prune_layer_index() is None:
            raise ValueError(f"token_method {type(self.token_method).__name__} removes no tokens")
        if self.neuron_method.prune_layer_index() is not None:
            raise ValueError(
                f"neuron_method {type(self.neuron_method).__name__} removes tokens; compose one token method with "
                "one neuron-only method (e.g. cm.CoreInfer, cm.TEAL)"
            )

    def check_layers(self, num_layers: int) -> None:
        self.token_method.check_layers(num_layers)
        self.neuron_method.check_layers(num_layers)
        if self.token_method.neuron_layer_indices(num_layers) or self.token_method.decode_ffn_layers(num_layers):
            raise ValueError(
                f"token_method {type(self.token_method).__name__} also decodes with sparse neurons; set its neuron "
                "layers to [] so that the neuron method alone decides them"
            )

    def prune_layer_index(self) -> int:
        return self.token_method.prune_layer_index()

    def prune_stage_layers(self) -> tuple[int, ...]:
        return self.token_method.prune_stage_layers()

    def wants_inputs(self) -> frozenset[str]:
        return self.token_method.wants_inputs()

    def wants_prune_activations(self) -> bool:
        return self.token_method.wants_prune_activations()

    def applies_to_text(self) -> bool:
        return self.neuron_method.applies_to_text()

    def neuron_layer_indices(self, num_layers: int) -> tuple[int, ...]:
        return self.neuron_method.neuron_layer_indices(num_layers)

    def decode_ffn_layers(self, num_layers: int) -> tuple[int, ...]:
        return self.neuron_method.decode_ffn_layers(num_layers)

    def select_tokens(self, batch: TokenBatch) -> TokenDecision:
        return self.token_method.select_tokens(batch)

    def select_neurons(self, activations: torch.Tensor, token_mask: torch.Tensor, layer: int) -> torch.Tensor:
        return self.neuron_method.select_neurons(activations, token_mask, layer)

    def select_tokens_and_neurons(self, batch, token_mask, layer):
        return self.select_tokens(batch), self.select_neurons(batch.activations, token_mask, layer)

    def needs_calibration(self) -> bool:
        return self.token_method.needs_calibration() or self.neuron_method.needs_calibration()

    def calibrate_ffn(self, layer, ffn, hidden, token_mask) -> None:
        self.neuron_method.calibrate_ffn(layer, ffn, hidden, token_mask)

    def decode_ffn(self, layer, ffn, hidden):
        return self.neuron_method.decode_ffn(layer, ffn, hidden)


def compose(token_method: SparsityMethod, neuron_method: SparsityMethod) -> Composed:
    """Any token method plus any neuron method in one `sparsify` call, e.g.
    `cm.compose(cm.VisionZip(54, 10), cm.TEAL(0.5))`."""
    return Composed(token_method, neuron_method)
