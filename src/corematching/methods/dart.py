"""DART: keep a few pivot tokens and the tokens least similar to them (duplication-aware token reduction).

Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More" (2025).
Per image at layer K, from the hidden states entering layer K + 1: the `pivots` visual tokens with the largest L1
norm are kept, and the `text_pivots` instruction tokens (the text after the image) with the largest L1 norm serve
as pivots too (they are text, kept anyway). The rest of the budget is split as evenly as possible between all
pivots, visual ones first (earlier pivots get the extra token), and each pivot in turn keeps, among the visual
tokens not yet kept, those with the lowest cosine similarity to it. An image keeps exactly its budget (only the
top-norm visual pivots when the budget is below `pivots`).
Simplified: DART ranks pivots and measures similarity on layer K's keys; here on the hidden states.
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
    instruction_mask,
    is_int,
)


def _top_l1(features: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` rows of features [n, H] with the largest L1 norm (ties: lower index)."""
    return torch.sort(features.abs().sum(-1), descending=True, stable=True).indices[:count]


@dataclass
class DART(SparsityMethod):
    """pivots: visual pivot tokens per image; token_budget: visual tokens kept per image (int or fraction);
    prune_layer: K, tokens removed after it; text_pivots: instruction tokens used as pivots too."""

    pivots: int = 4
    token_budget: int | float = 0.25
    prune_layer: int = 2
    text_pivots: int = 0

    def __post_init__(self):
        check_positive_int("pivots", self.pivots)
        if not is_int(self.text_pivots) or self.text_pivots < 0:
            raise ValueError(f"text_pivots must be an int >= 0, got {self.text_pivots!r}")
        check_token_budget(self.token_budget, allow_adaptive=False)
        check_layer_index("prune_layer", self.prune_layer)

    def prune_layer_index(self) -> int:
        return self.prune_layer

    def wants_inputs(self) -> frozenset[str]:
        return frozenset({"hidden_states"})

    def select_tokens(self, batch: TokenBatch) -> TokenDecision:
        keep = torch.zeros_like(batch.visual_mask)
        instruction = instruction_mask(batch)
        for row, positions in images_of(batch):
            features = batch.hidden_states[row, positions].float()  # [n, H]
            budget = budget_of(self.token_budget, positions.numel())
            num_pivots = min(self.pivots, budget)
            pivots = _top_l1(features, num_pivots)
            chosen = torch.zeros(positions.numel(), dtype=torch.bool, device=positions.device)
            chosen[pivots] = True
            normalized = F.normalize(features, dim=-1)
            text = batch.hidden_states[row, instruction[row]].float()  # [m, H]
            text_pivots = F.normalize(text[_top_l1(text, min(self.text_pivots, text.shape[0]))], dim=-1)
            references = torch.cat([normalized[pivots], text_pivots])  # [pivots + text pivots, H]
            rest = budget - num_pivots
            for index, reference in enumerate(references):
                share = rest // len(references) + (1 if index < rest % len(references) else 0)
                if share == 0:
                    continue
                similarity = (normalized @ reference).masked_fill(chosen, float("inf"))
                chosen[torch.sort(similarity, stable=True).indices[:share]] = True
            keep[row, positions[chosen]] = True
        return TokenDecision(keep_visual=keep & batch.visual_mask)
