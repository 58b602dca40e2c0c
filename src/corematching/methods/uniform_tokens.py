"""UniformTokens: visual tokens evenly spaced over each image's 2-D token grid (a baseline)."""

from dataclasses import dataclass

import torch

from ..selection import budget_counts, order_groups
from . import defaults
from .base import SparsityMethod, TokenBatch, TokenDecision, check_layer_index, check_token_budget


def evenly_spaced(index: torch.Tensor, length: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Whether index (0..length-1) is one of `count` evenly spaced picks floor((i + 1/2) * length / count).

    Elementwise on long tensors (broadcast). The picks before index number ceil(index * count / length - 1/2),
    so index is picked exactly when that number grows at index + 1.
    """
    count = torch.minimum(count, length)
    length = length.clamp(min=1)

    def picks_before(i):
        return (2 * i * count + length - 1) // (2 * length)

    return (count > 0) & (picks_before(index + 1) > picks_before(index))


def grid_selection(ordinal: torch.Tensor, rows, cols, count: torch.Tensor) -> torch.Tensor:
    """Pick `count` tokens spread over a rows x cols grid (row-major ordinals): evenly spaced rows, then the
    tokens spread over those rows as evenly as the count allows, evenly spaced inside each row. rows and cols
    are ints or long tensors shaped like ordinal (each token's own image grid, at least 1 x 1)."""
    rows = torch.as_tensor(rows, device=ordinal.device).expand_as(ordinal)
    cols = torch.as_tensor(cols, device=ordinal.device).expand_as(ordinal)
    count = torch.minimum(count, rows * cols)
    row, col = ordinal // cols, ordinal % cols
    # Rows so that the picked lattice is about as dense along both axes, and wide enough for `count` tokens.
    ideal_rows = torch.sqrt(count.to(torch.float32) * rows / cols).round().long()
    min_rows = (count + cols - 1) // cols
    num_rows = torch.minimum(torch.maximum(ideal_rows, min_rows), torch.minimum(count, rows))
    row_picked = evenly_spaced(row, rows, num_rows)
    row_rank = (2 * row * num_rows + rows - 1) // (2 * rows)  # picked rows before this one
    num_rows = num_rows.clamp(min=1)
    in_this_row = (row_rank + 1) * count // num_rows - row_rank * count // num_rows
    col_picked = evenly_spaced(col, cols, in_this_row)
    return row_picked & col_picked


@dataclass
class UniformTokens(SparsityMethod):
    """Keeps token_budget visual tokens per image spread evenly over the image grid (2-D); removes the rest
    after prune_layer. Images whose token count does not fill their grid are spread along one axis."""

    token_budget: int | float = defaults.TOKEN_BUDGET
    prune_layer: int = defaults.PRUNE_LAYER

    def __post_init__(self):
        check_token_budget(self.token_budget, allow_adaptive=False)
        check_layer_index("prune_layer", self.prune_layer)

    def prune_layer_index(self) -> int:
        return self.prune_layer

    def select_tokens(self, batch: TokenBatch) -> TokenDecision:
        groups = batch.image_index
        order = order_groups(torch.zeros_like(groups), groups)  # only for the group sizes
        count = budget_counts(order, self.token_budget)  # [B, T]
        size = order.size
        ordinal = batch.image_ordinal.clamp(min=0)
        picked = evenly_spaced(ordinal, size, count)
        if batch.grid_rows is not None:
            rows, cols = batch.grid_rows, batch.grid_cols
        elif batch.image_grid is not None:
            rows, cols = (torch.full_like(ordinal, side) for side in batch.image_grid)
        else:
            rows = cols = None
        if rows is not None:  # images whose tokens fill their grid get a 2-D spread
            on_grid = grid_selection(ordinal, rows.clamp(min=1), cols.clamp(min=1), count)
            picked = torch.where((size == rows * cols) & (rows > 0), on_grid, picked)
        return TokenDecision(keep_visual=picked & batch.visual_mask & (groups >= 0))
