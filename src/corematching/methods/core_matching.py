"""CoreMatching: the neurons choose the tokens, the kept tokens choose the neurons (the rules: selection.py)."""

from dataclasses import dataclass

import torch

from ..neuron_rules import RULES, neuron_count
from ..neuron_rules import select as select_by_rule
from ..selection import (
    last_token_mask,
    match_scores,
    neuron_mask,
    select_by_score,
    sentence_core_neurons,
    token_core_neurons,
)
from . import defaults
from .base import (
    SparsityMethod,
    TokenBatch,
    TokenDecision,
    check_layer_index,
    check_layer_list,
    check_positive_int,
    check_ratio,
    check_token_budget,
)
from .neuron_budgets import read_budgets


@dataclass
class CoreMatching(SparsityMethod):
    """Co-adaptive token and neuron sparsity.

    prune_layer: tokens are scored from this layer's FFN activations and removed after it.
    token_budget: visual tokens kept per image: an int, a fraction in (0, 1], or None for the elbow rule.
    rho, beta: token-wise and sentence-wise core neuron ratios, in (0, 1].
    neuron_layers: layers that decode with core neurons; None means the measured default: none (or the layers
        neuron_budgets name), as core-neuron decoding cost too much accuracy on the bundled model (defaults.py).
    match: the match set whose core neurons score the visual tokens: "all", "text" or "last".
    min_tokens: the fewest visual tokens an image keeps.
    neuron_rule: how the decode neurons are chosen from a layer's prefill activations (corematching.
        neuron_rules): "paper" (C_beta: frequency among the tokens' top positive activations), "magnitude"
        (frequency among top |a|) or "mass" (largest sum of |a|).
    neuron_budgets: per-layer shares of the FFN width kept while decoding, {layer: share in (0, 1]}, or a
        calibration (cm.calibrate's result, or the path of its JSON). With budgets and neuron_layers None, the
        layers decoding with core neurons are those with a budget below 1; a neuron layer without a budget
        keeps beta of the width.
    """

    prune_layer: int = defaults.PRUNE_LAYER
    token_budget: int | float | None = defaults.TOKEN_BUDGET
    rho: float = defaults.RHO
    beta: float = defaults.BETA
    neuron_layers: list[int] | None = defaults.NEURON_LAYERS
    match: str = defaults.MATCH
    min_tokens: int = defaults.MIN_TOKENS
    neuron_rule: str = defaults.NEURON_RULE
    neuron_budgets: dict | str | None = defaults.NEURON_BUDGETS

    def __post_init__(self):
        check_layer_index("prune_layer", self.prune_layer)
        check_token_budget(self.token_budget, allow_adaptive=True)
        check_ratio("rho", self.rho)
        check_ratio("beta", self.beta)
        check_layer_list("neuron_layers", self.neuron_layers)
        if self.match not in defaults.MATCH_SETS:
            raise ValueError(f"match must be one of {defaults.MATCH_SETS}, got {self.match!r}")
        check_positive_int("min_tokens", self.min_tokens)
        if self.neuron_rule not in RULES:
            raise ValueError(f"neuron_rule must be one of {RULES}, got {self.neuron_rule!r}")
        self._budgets = None if self.neuron_budgets is None else read_budgets(self.neuron_budgets, "neuron_budgets")

    def prune_layer_index(self) -> int:
        return self.prune_layer

    def wants_prune_activations(self) -> bool:
        return True

    def neuron_layer_indices(self, num_layers: int) -> tuple[int, ...]:
        if self.neuron_layers is None and self._budgets is not None:
            return tuple(layer for layer, share in self._budgets.items() if share < 1)
        if self.neuron_layers is None:
            return ()
        return check_layer_list("neuron_layers", self.neuron_layers)

    def check_layers(self, num_layers: int) -> None:
        super().check_layers(num_layers)
        outside = [layer for layer in self.neuron_layer_indices(num_layers) if layer >= num_layers]
        if outside:
            raise ValueError(
                f"neuron_layers {outside} are out of range: the language model has {num_layers} layers"
            )

    def match_mask(self, batch: TokenBatch) -> torch.Tensor:
        """The match set S_match of each sample: bool [B, T]."""
        if self.match == "all":
            return batch.valid_mask
        if self.match == "text":
            return batch.valid_mask & ~batch.visual_mask
        return last_token_mask(batch.valid_mask)

    def select_tokens(self, batch: TokenBatch) -> TokenDecision:
        token_core = token_core_neurons(batch.activations, self.rho)
        return self._decide_tokens(batch, token_core)

    def neuron_share(self, layer: int) -> float:
        """The share of the FFN width layer `layer` decodes with: its budget, else beta."""
        return self.beta if self._budgets is None else self._budgets.get(layer, self.beta)

    def select_neurons(self, activations: torch.Tensor, token_mask: torch.Tensor, layer: int) -> torch.Tensor:
        share = self.neuron_share(layer)
        if self.neuron_rule == "paper" and share == self.beta:
            token_core = token_core_neurons(activations, self.rho)
            return sentence_core_neurons(token_core, activations, token_mask, self.beta)
        count = neuron_count(activations.shape[-1], share)
        return select_by_rule(self.neuron_rule, activations, token_mask, count, self.rho)

    def select_tokens_and_neurons(
        self, batch: TokenBatch, token_mask: torch.Tensor, layer: int
    ) -> tuple[TokenDecision, torch.Tensor]:
        if self.neuron_rule != "paper" or self.neuron_share(layer) != self.beta:
            return self.select_tokens(batch), self.select_neurons(batch.activations, token_mask, layer)
        token_core = token_core_neurons(batch.activations, self.rho)  # shared by both choices
        neurons = sentence_core_neurons(token_core, batch.activations, token_mask, self.beta)
        return self._decide_tokens(batch, token_core), neurons

    def _decide_tokens(self, batch: TokenBatch, token_core: torch.Tensor) -> TokenDecision:
        activations = batch.activations
        match_core = sentence_core_neurons(token_core, activations, self.match_mask(batch), self.beta)
        scores = match_scores(token_core, neuron_mask(match_core, activations.shape[-1]))
        keep = select_by_score(scores, batch.image_index, self.token_budget, self.min_tokens)
        return TokenDecision(keep_visual=keep & batch.visual_mask, scores=scores.to(torch.float32))
