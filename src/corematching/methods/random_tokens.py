"""RandomTokens: a seeded random subset of each image's visual tokens (a baseline)."""

from dataclasses import dataclass

import torch

from .. import selection
from . import defaults
from .base import SparsityMethod, TokenBatch, TokenDecision, check_layer_index, check_token_budget, is_int

_MODULUS = 2**31


def _mix(values: torch.Tensor) -> torch.Tensor:
    """A small integer hash on int64 values in [0, 2**31), staying in that range (no overflow)."""
    for _ in range(3):
        values = (values * 1103515245 + 12345) % _MODULUS
        values = values ^ (values >> 13)
    return values


def token_noise(seed: int, image_index: torch.Tensor, image_ordinal: torch.Tensor) -> torch.Tensor:
    """A pseudo-random score in [0, 1) per visual token, a function of (seed, image, position in the image)
    only, so a sample draws the same tokens whatever its batch mates, padding or device."""
    mixed = _mix(torch.full_like(image_index, seed % _MODULUS))
    mixed = _mix((mixed + image_index.clamp(min=0)) % _MODULUS)
    mixed = _mix((mixed + image_ordinal.clamp(min=0)) % _MODULUS)
    return mixed.to(torch.float64).div(_MODULUS).to(torch.float32)


@dataclass
class RandomTokens(SparsityMethod):
    """Keeps token_budget visual tokens per image, drawn at random from seed; removes the rest after prune_layer."""

    token_budget: int | float = defaults.TOKEN_BUDGET
    seed: int = defaults.RANDOM_SEED
    prune_layer: int = defaults.PRUNE_LAYER

    def __post_init__(self):
        check_token_budget(self.token_budget, allow_adaptive=False)
        if not is_int(self.seed):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        check_layer_index("prune_layer", self.prune_layer)

    def prune_layer_index(self) -> int:
        return self.prune_layer

    def select_tokens(self, batch: TokenBatch) -> TokenDecision:
        scores = token_noise(self.seed, batch.image_index, batch.image_ordinal)
        keep = selection.select_by_score(scores, batch.image_index, self.token_budget)
        return TokenDecision(keep_visual=keep & batch.visual_mask, scores=scores)
