"""RandomTokens: a seeded random subset of each image's visual tokens (a baseline)."""

from dataclasses import dataclass

import torch

from ..selection import HASH_MODULUS, hash_mix, select_by_score
from . import defaults
from .base import SparsityMethod, TokenBatch, TokenDecision, check_layer_index, check_token_budget, is_int


def token_noise(seed: int, image_key: torch.Tensor, image_ordinal: torch.Tensor) -> torch.Tensor:
    """A pseudo-random score in [0, 1) per visual token, a function of (seed, the image's key, position in the
    image) only, so a sample draws the same tokens whatever its batch mates, padding or device."""
    mixed = hash_mix(torch.full_like(image_key, seed % HASH_MODULUS))
    mixed = hash_mix(mixed + image_key.clamp(min=0))
    mixed = hash_mix(mixed + image_ordinal.clamp(min=0))
    return mixed.to(torch.float64).div(HASH_MODULUS).to(torch.float32)


@dataclass
class RandomTokens(SparsityMethod):
    """Keeps token_budget visual tokens per image, drawn at random; removes the rest after prune_layer.

    The draw of an image is seeded by `seed` and a hash of the image's own input (its pixels), so different
    images keep different positions, the same image always keeps the same ones, and batch mates never matter.
    """

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

    def wants_inputs(self) -> frozenset[str]:
        return frozenset({"image_fingerprint"})

    def select_tokens(self, batch: TokenBatch) -> TokenDecision:
        fingerprint = batch.image_fingerprint
        if fingerprint is None:  # a batch built by hand: the draw depends on the positions only
            fingerprint = torch.zeros_like(batch.image_index)
        scores = token_noise(self.seed, fingerprint, batch.image_ordinal)
        keep = select_by_score(scores, batch.image_index, self.token_budget)
        return TokenDecision(keep_visual=keep & batch.visual_mask, scores=scores)
