"""PDrop: pyramid visual-token dropping, each stage ranked like FastV.

Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy
Reduction" (CVPR 2025). The decoder is split into stages; at the end of each stage the last instruction token's
attention (averaged over heads) ranks the visual tokens that are left, and a share `ratio` of them goes on. The
paper's LLaVA-1.5 setting (32 layers) ends stages after layers 8, 16 and 24 with ratio 0.5 each: 576 visual tokens,
then 288, 144 and 72.

Each stage removes its tokens for real: the layers after a stage's layer hold only its kept tokens in their KV
cache, and the last token's attention row is computed from that layer's queries and keys over the tokens still
there (`sdpa` keeps working). Simplified: the paper ranks with the attention of the last instruction token, here
the last prompt token (the same token for a prompt that ends with the instruction, as chat templates without a
generation header do; with one, the header's last token).
"""

from dataclasses import dataclass

from ..selection import select_by_score
from .base import SparsityMethod, TokenBatch, TokenDecision, check_layer_index, check_ratio


@dataclass
class PDrop(SparsityMethod):
    """schedule: stages ((layer, ratio), ...) at increasing layers: after `layer`, each image keeps
    ceil(ratio * its visual tokens still there)."""

    schedule: tuple = ((8, 0.5), (16, 0.5), (24, 0.5))

    def __post_init__(self):
        stages = self.schedule
        if isinstance(stages, (str, bytes)) or not hasattr(stages, "__len__") or len(stages) == 0:
            raise ValueError(f"schedule must be a non-empty sequence of (layer, ratio) stages, got {stages!r}")
        for stage in stages:
            if not hasattr(stage, "__len__") or len(stage) != 2:
                raise ValueError(f"schedule: each stage is a (layer, ratio) pair, got {stage!r}")
            check_layer_index("schedule layer", stage[0])
            check_ratio("schedule ratio", stage[1])
        layers = [int(stage[0]) for stage in stages]
        if any(later <= earlier for earlier, later in zip(layers, layers[1:])):
            raise ValueError(f"schedule: the stages' layers must increase, got {layers}")

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(int(stage[0]) for stage in self.schedule)

    @property
    def ratios(self) -> tuple[float, ...]:
        return tuple(float(stage[1]) for stage in self.schedule)

    def prune_layer_index(self) -> int:
        return self.layers[0]

    def prune_stage_layers(self) -> tuple[int, ...]:
        return self.layers

    def wants_inputs(self) -> frozenset[str]:
        return frozenset({"last_attention"})

    def select_tokens(self, batch: TokenBatch) -> TokenDecision:
        scores = batch.last_attention
        keep = select_by_score(scores, batch.image_index, self.ratios[batch.stage])
        return TokenDecision(keep_visual=keep & batch.visual_mask, scores=scores)
