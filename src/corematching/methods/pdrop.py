"""PDrop: pyramid visual-token dropping, each stage ranked like FastV.

Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy
Reduction" (CVPR 2025). The decoder is split into stages; at the end of each stage the last instruction token's
attention (averaged over heads) ranks the visual tokens that are left, and a share `ratio` of them goes on.

Limit: the engine removes tokens after one layer, so a schedule has one stage, (layer, ratio); a schedule of
several stages raises ValueError. With one stage PDrop is FastV with a fractional budget.
"""

from dataclasses import dataclass

from .. import selection
from .base import SparsityMethod, TokenBatch, TokenDecision, check_layer_index, check_ratio


@dataclass
class PDrop(SparsityMethod):
    """schedule: stages ((layer, ratio), ...): after `layer`, each image keeps ceil(ratio * its visual tokens)."""

    schedule: tuple = ((2, 0.5),)

    def __post_init__(self):
        stages = self.schedule
        if isinstance(stages, (str, bytes)) or not hasattr(stages, "__len__") or len(stages) == 0:
            raise ValueError(f"schedule must be a non-empty sequence of (layer, ratio) stages, got {stages!r}")
        for stage in stages:
            if not hasattr(stage, "__len__") or len(stage) != 2:
                raise ValueError(f"schedule: each stage is a (layer, ratio) pair, got {stage!r}")
            check_layer_index("schedule layer", stage[0])
            check_ratio("schedule ratio", stage[1])
        if len(stages) > 1:
            raise ValueError(
                f"schedule has {len(stages)} stages, but tokens are removed after one layer only (the KV cache keeps "
                "one set of tokens for the layers after it); give one stage, e.g. ((8, 0.5),)"
            )

    @property
    def layer(self) -> int:
        return int(self.schedule[0][0])

    @property
    def ratio(self) -> float:
        return float(self.schedule[0][1])

    def prune_layer_index(self) -> int:
        return self.layer

    def wants_inputs(self) -> frozenset[str]:
        return frozenset({"last_attention"})

    def select_tokens(self, batch: TokenBatch) -> TokenDecision:
        scores = batch.last_attention
        keep = selection.select_by_score(scores, batch.image_index, self.ratio)
        return TokenDecision(keep_visual=keep & batch.visual_mask, scores=scores)
