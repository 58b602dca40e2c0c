"""DivPrune: the visual tokens that are most diverse, by greedy max-min distance.

Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models" (CVPR 2025).
Per image, with d(i, j) = 1 - cos(e_i, e_j) over the tokens' features: the first token kept is the one farthest
from its nearest neighbour (largest min_j d(i, j)); each next one is the token whose distance to the nearest kept
token is largest (ties: the lower position), until the budget is reached.
Features: the embeddings entering the language model when prune_layer is -1 (the paper's setting, pruning before
the language model), else the hidden states entering layer prune_layer + 1.
Simplified: nothing beyond the choice of features for prune_layer >= 0.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import SparsityMethod, TokenBatch, TokenDecision, budget_of, check_token_budget, images_of, is_int


def check_prune_layer_or_before(value) -> int:
    if not is_int(value) or value < -1:
        raise ValueError(f"prune_layer must be an int >= -1 (-1: before the language model), got {value!r}")
    return int(value)


def token_features(batch: TokenBatch, prune_layer: int) -> torch.Tensor:
    """[B, T, H]: the features a diversity method compares at its prune layer."""
    return batch.input_embeddings if prune_layer == -1 else batch.hidden_states


def features_wanted(prune_layer: int) -> frozenset[str]:
    return frozenset({"input_embeddings" if prune_layer == -1 else "hidden_states"})


def max_min_diverse(features: torch.Tensor, count: int) -> torch.Tensor:
    """Indices (in pick order) of `count` rows of features [n, H] chosen greedily by max-min cosine distance."""
    normalized = F.normalize(features.float(), dim=-1)
    distance = 1 - normalized @ normalized.T  # [n, n]
    size = features.shape[0]
    picked = torch.zeros(size, dtype=torch.bool, device=features.device)
    nearest_other = distance.masked_fill(torch.eye(size, dtype=torch.bool, device=features.device), float("inf"))
    first = int(nearest_other.amin(dim=1).argmax()) if size > 1 else 0
    order = [first]
    picked[first] = True
    to_nearest_picked = distance[first].clone()
    for _ in range(count - 1):
        candidate = int(to_nearest_picked.masked_fill(picked, float("-inf")).argmax())
        order.append(candidate)
        picked[candidate] = True
        to_nearest_picked = torch.minimum(to_nearest_picked, distance[candidate])
    return torch.tensor(order, dtype=torch.long, device=features.device)


@dataclass
class FeatureSelection(SparsityMethod):
    """What the feature-similarity methods share: token_budget visual tokens kept per image (int or fraction),
    chosen from features at prune_layer: -1 (the embeddings entering the language model) or K (the hidden
    states entering layer K + 1)."""

    token_budget: int | float = 0.25
    prune_layer: int = -1

    def __post_init__(self):
        check_token_budget(self.token_budget, allow_adaptive=False)
        check_prune_layer_or_before(self.prune_layer)

    def prune_layer_index(self) -> int:
        return self.prune_layer

    def wants_inputs(self) -> frozenset[str]:
        return features_wanted(self.prune_layer)


@dataclass
class DivPrune(FeatureSelection):
    """token_budget: visual tokens kept per image (int or fraction); prune_layer: -1 (before the language model)
    or the layer K after which tokens are removed."""

    def select_tokens(self, batch: TokenBatch) -> TokenDecision:
        features = token_features(batch, self.prune_layer)
        keep = torch.zeros_like(batch.visual_mask)
        for row, positions in images_of(batch):
            chosen = max_min_diverse(features[row, positions], budget_of(self.token_budget, positions.numel()))
            keep[row, positions[chosen]] = True
        return TokenDecision(keep_visual=keep & batch.visual_mask)
