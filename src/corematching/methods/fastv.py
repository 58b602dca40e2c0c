"""FastV: visual tokens ranked by the attention the last prompt token pays them at layer K.

Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large
Vision-Language Models" (ECCV 2024). At layer K the last prompt token's attention row, averaged over heads, scores
every visual token; each image keeps its `token_budget` best and the rest are removed after layer K.
The row is computed from layer K's own queries and keys (method_inputs.py), so sdpa attention stays in place.
Simplified: nothing. Budgets apply per image (the paper has one image per prompt).
"""

from dataclasses import dataclass

from ..selection import select_by_score
from .base import SparsityMethod, TokenBatch, TokenDecision, check_layer_index, check_token_budget


@dataclass
class FastV(SparsityMethod):
    """prune_layer: the layer K whose attention ranks the tokens (removed after it); token_budget: visual tokens
    kept per image, an int or a fraction in (0, 1]."""

    prune_layer: int = 2
    token_budget: int | float = 0.5

    def __post_init__(self):
        check_layer_index("prune_layer", self.prune_layer)
        check_token_budget(self.token_budget, allow_adaptive=False)

    def prune_layer_index(self) -> int:
        return self.prune_layer

    def wants_inputs(self) -> frozenset[str]:
        return frozenset({"last_attention"})

    def select_tokens(self, batch: TokenBatch) -> TokenDecision:
        scores = batch.last_attention
        keep = select_by_score(scores, batch.image_index, self.token_budget)
        return TokenDecision(keep_visual=keep & batch.visual_mask, scores=scores)
