"""VisionZip: dominant tokens by the vision tower's attention, the rest merged into a few contextual tokens, before
the language model.

Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models" (CVPR 2025).
Per image, with a_i the attention visual token i received in the tower's feature layer (from the CLS token where
the tower has one, else averaged over queries), k_i its key there (averaged over heads) and e_i its embedding
entering the language model:
  - dominant: the `dominant` tokens with the largest a_i (ties: lower position), kept unchanged;
  - contextual: of the remaining R tokens (in position order), every max(1, R // contextual)-th is a target, up to
    `contextual` of them; every other remaining token is assigned to the target whose key is most cosine-similar
    to its own (ties: the earlier target), and the target's embedding becomes
        e_target + mean(e_j for j assigned to it)      (e_target alone when none is assigned);
    the other remaining tokens are removed.
Where the tower runs on tiles (LLaVA-NeXT: a base view and high-resolution tiles per image), each visual token
takes a_i and k_i of its own tile's patch, and an image's tokens (all its tiles) are ranked together.
Kept and merged tokens keep their original positions; the removal happens before layer 0 (prune layer -1), so
the language model runs every layer on the kept tokens only, and layer 0 sees the merged embeddings.
Simplified: the merge averages the embeddings after the projector, where VisionZip averages the tower's hidden
states before it (the projector is not linear, so the two differ); and tokens keep their original positions
instead of being packed into a shorter image (dominant first, then contextual).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import SparsityMethod, TokenBatch, TokenDecision, budget_of, check_token_budget, images_of, is_int


def _count(value: int | float, size: int) -> int:
    return 0 if value == 0 else budget_of(value, size)


@dataclass
class VisionZip(SparsityMethod):
    """dominant: tokens kept per image by tower attention; contextual: merged tokens per image. Each an int count
    or a fraction in (0, 1] of the image's tokens; contextual may be 0."""

    dominant: int | float = 54
    contextual: int | float = 10

    def __post_init__(self):
        try:
            check_token_budget(self.dominant, allow_adaptive=False)
        except ValueError as error:
            raise ValueError(str(error).replace("token_budget", "dominant")) from None
        if not (is_int(self.contextual) and self.contextual == 0):
            try:
                check_token_budget(self.contextual, allow_adaptive=False)
            except ValueError as error:
                raise ValueError(str(error).replace("token_budget", "contextual") + " (or 0)") from None

    def prune_layer_index(self) -> int:
        return -1

    def wants_inputs(self) -> frozenset[str]:
        return frozenset({"vision_attention", "vision_keys", "input_embeddings"})

    def select_tokens(self, batch: TokenBatch) -> TokenDecision:
        keep = torch.zeros_like(batch.visual_mask)
        merged = batch.input_embeddings.clone()
        for row, positions in images_of(batch):
            size = positions.numel()
            attention = batch.vision_attention[row, positions]
            num_dominant = _count(self.dominant, size)
            order = torch.sort(attention, descending=True, stable=True).indices
            is_dominant = torch.zeros(size, dtype=torch.bool, device=positions.device)
            is_dominant[order[:num_dominant]] = True
            keep[row, positions[is_dominant]] = True
            remaining = positions[~is_dominant]  # in position order
            num_targets = min(_count(self.contextual, size), remaining.numel())
            if num_targets == 0:
                continue
            step = max(1, remaining.numel() // num_targets)
            is_target = torch.zeros(remaining.numel(), dtype=torch.bool, device=positions.device)
            is_target[torch.arange(0, remaining.numel(), step, device=positions.device)[:num_targets]] = True
            targets, others = remaining[is_target], remaining[~is_target]
            keep[row, targets] = True
            if others.numel() == 0:
                continue
            embeddings, keys = batch.input_embeddings[row], batch.vision_keys[row]
            other_directions = F.normalize(keys[others].float(), dim=-1)
            similarity = other_directions @ F.normalize(keys[targets].float(), dim=-1).T  # [others, targets]
            assigned = F.one_hot(similarity.argmax(dim=1), targets.numel()).to(embeddings.dtype)
            counts = assigned.sum(0).clamp(min=1).unsqueeze(1)
            merged[row, targets] = embeddings[targets] + (assigned.T @ embeddings[others]) / counts
        scores = batch.vision_attention.to(torch.float32)
        return TokenDecision(keep_visual=keep & batch.visual_mask, scores=scores, merged_hidden=merged)
