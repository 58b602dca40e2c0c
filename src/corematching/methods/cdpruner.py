"""CDPruner: conditional diversity, a determinantal point process over the visual tokens weighted by their relevance
to the instruction.

Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs" (2025).
Per image, with v_i the visual tokens' features, e_i their input embeddings and t_j the instruction's token
embeddings (the text after the image): S_ij = cos(v_i, v_j); relevance r_i = mean_j cos(e_i, t_j), min-max scaled
to [0, 1] over the image (all 1 when it is flat or there is no instruction); the kernel L = diag(r) S diag(r);
the kept set is the greedy MAP of the DPP with kernel L (each step adds the token with the largest gain in
log det L_S, via the incremental Cholesky update of Chen et al., NeurIPS 2018). When the gains vanish before the
budget is reached, the rest is filled by relevance (ties: lower position).
Features: the embeddings entering the language model when prune_layer is -1 (the paper's setting), else the
hidden states entering layer prune_layer + 1; relevance is always measured between input embeddings.
Simplified: the paper measures relevance with the vision-language model's own text encoder (CLIP's text tower
for LLaVA, where it also flips the sign); here relevance is the plain cosine in the language model's input space.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import (
    TokenBatch,
    TokenDecision,
    budget_of,
    images_of,
    instruction_mask,
)
from .divprune import FeatureSelection, token_features

GAIN_FLOOR = 1e-10


def greedy_dpp(kernel: torch.Tensor, count: int) -> list[int]:
    """Greedy MAP of a DPP with PSD kernel [n, n]: indices in pick order, stopping early when gains vanish."""
    size = kernel.shape[0]
    gains = kernel.diagonal().clone()  # d_i^2: the gain in det of adding i
    basis = torch.zeros(count, size, dtype=kernel.dtype, device=kernel.device)
    picked: list[int] = []
    for step in range(count):
        if picked:
            gains[picked] = float("-inf")
        best = int(gains.argmax())
        if gains[best] <= GAIN_FLOOR:
            break
        picked.append(best)
        row = (kernel[best] - basis[:step].T @ basis[:step, best]) / gains[best].sqrt()
        basis[step] = row
        gains = gains - row.square()
    return picked


@dataclass
class CDPruner(FeatureSelection):
    """token_budget: visual tokens kept per image (int or fraction); prune_layer: -1 (before the language model)
    or the layer K after which tokens are removed."""

    def wants_inputs(self) -> frozenset[str]:
        return super().wants_inputs() | {"input_embeddings"}  # relevance is measured between input embeddings

    def select_tokens(self, batch: TokenBatch) -> TokenDecision:
        features = token_features(batch, self.prune_layer)
        instruction = instruction_mask(batch)
        keep = torch.zeros_like(batch.visual_mask)
        scores = torch.zeros(batch.visual_mask.shape, dtype=torch.float32, device=batch.visual_mask.device)
        for row, positions in images_of(batch):
            visual = F.normalize(features[row, positions].float(), dim=-1)  # [n, H]
            text = F.normalize(batch.input_embeddings[row, instruction[row]].float(), dim=-1)  # [m, H]
            if text.shape[0]:
                relevance = (F.normalize(batch.input_embeddings[row, positions].float(), dim=-1) @ text.T).mean(1)
                low, high = relevance.min(), relevance.max()
                relevance = (relevance - low) / (high - low) if high > low else torch.ones_like(relevance)
            else:
                relevance = torch.ones(positions.numel(), device=visual.device)
            kernel = relevance.unsqueeze(1) * (visual @ visual.T) * relevance.unsqueeze(0)
            budget = budget_of(self.token_budget, positions.numel())
            picked = greedy_dpp(kernel.double(), budget)
            chosen = torch.zeros(positions.numel(), dtype=torch.bool, device=visual.device)
            chosen[picked] = True
            if len(picked) < budget:  # the kernel's rank ran out: fill by relevance
                fill = torch.sort(relevance.masked_fill(chosen, float("-inf")), descending=True, stable=True).indices
                chosen[fill[: budget - len(picked)]] = True
            keep[row, positions[chosen]] = True
            scores[row, positions] = relevance
        return TokenDecision(keep_visual=keep & batch.visual_mask, scores=scores)
