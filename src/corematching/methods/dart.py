"""DART: keep a few pivot tokens and the tokens least similar to them (duplication-aware token reduction).

Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More" (2025).
Per image at layer K, from the hidden states entering layer K + 1: the `pivots` visual tokens with the largest L1
norm are kept; the rest of the budget is split as evenly as possible between the pivots (earlier pivots get the
extra token), and each pivot in turn keeps, among the tokens not yet kept, those with the lowest cosine similarity
to it. An image keeps exactly its budget (only the top-norm pivots when the budget is below `pivots`).
Simplified: DART ranks pivots and similarities on layer K's keys and also takes pivots among the text tokens;
here the hidden states and visual pivots only.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import (
    SparsityMethod,
    TokenBatch,
    TokenDecision,
    budget_of,
    check_layer_index,
    check_positive_int,
    check_token_budget,
    images_of,
)


@dataclass
class DART(SparsityMethod):
    """pivots: pivot tokens per image; token_budget: visual tokens kept per image (int or fraction);
    prune_layer: K, tokens removed after it."""

    pivots: int = 4
    token_budget: int | float = 0.25
    prune_layer: int = 2

    def __post_init__(self):
        check_positive_int("pivots", self.pivots)
        check_token_budget(self.token_budget, allow_adaptive=False)
        check_layer_index("prune_layer", self.prune_layer)

    def prune_layer_index(self) -> int:
        return self.prune_layer

    def wants_inputs(self) -> frozenset[str]:
        return frozenset({"hidden_states"})

    def select_tokens(self, batch: TokenBatch) -> TokenDecision:
        keep = torch.zeros_like(batch.visual_mask)
        for row, positions in images_of(batch):
            features = batch.hidden_states[row, positions].float()  # [n, H]
            budget = budget_of(self.token_budget, positions.numel())
            norms = features.abs().sum(-1)
            num_pivots = min(self.pivots, budget)
            pivots = torch.sort(norms, descending=True, stable=True).indices[:num_pivots]
            chosen = torch.zeros(positions.numel(), dtype=torch.bool, device=positions.device)
            chosen[pivots] = True
            normalized = F.normalize(features, dim=-1)
            rest = budget - num_pivots
            for index, pivot in enumerate(pivots.tolist()):
                share = rest // num_pivots + (1 if index < rest % num_pivots else 0)
                if share == 0:
                    continue
                similarity = (normalized @ normalized[pivot]).masked_fill(chosen, float("inf"))
                chosen[torch.sort(similarity, stable=True).indices[:share]] = True
            keep[row, positions[chosen]] = True
        return TokenDecision(keep_visual=keep & batch.visual_mask)
