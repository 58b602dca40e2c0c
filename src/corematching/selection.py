"""The shared math of CoreMatching: core neurons, match scores, token budgets (each rule stated below).

Everything here is batched tensor code on the input's device. Shapes:
  B batch, T tokens, F FFN width (d_ff).
  activations [B, T, F]   the input of down_proj, a(x)
  token_mask  [B, T]      bool, the tokens that take part (padding and absent tokens are False)
  groups      [B, T]      long, the image each visual token belongs to (0, 1, ... within a sample), -1 otherwise
Padding never changes a sample's result: masked tokens are excluded from every count and sum.
Costs are O(B * T * F) (plus a top-k over F per token); there are no token x token matrices and no host
round trips (no .item(), no numpy).

Ratios (rho, beta, fractional budgets) are applied as exact fractions: `ceil(r * n)` is computed as the
integer ceil(p * n / q) where p / q is the nearest fraction to r with q <= 10**6, so that ceil(0.2 * 5) is 1
and not 2 because of float rounding.
"""

from dataclasses import dataclass
from fractions import Fraction

import torch

MAX_RATIO_DENOMINATOR = 1_000_000


def ceil_ratio(count, ratio: float):
    """ceil(ratio * count) for an int or an integer tensor, computed exactly (see the module docstring)."""
    fraction = Fraction(ratio).limit_denominator(MAX_RATIO_DENOMINATOR)
    numerator, denominator = fraction.numerator, fraction.denominator
    return (count * numerator + denominator - 1) // denominator


# ---------------------------------------------------------------------------------------------- core neurons


def token_core_neurons(activations: torch.Tensor, rho: float) -> torch.Tensor:
    """C_rho(x) for every token, as a bool mask [..., F].

    P(x) = {n : a_n(x) > 0}, k(x) = ceil(rho * |P(x)|); C_rho(x) holds the k(x) neurons of P(x) with the largest
    activation, equal activations going to the lower neuron index. A token without positive activation has an
    empty set.

    No sort: one selection per row finds the k(x)-th largest activation, then every neuron is compared with it;
    only the neurons tied at that threshold need their index order.
    """
    dtype = activations.dtype
    # Bool counts are summed as int32: summing bools as int64 copies the whole tensor first.
    core_size = ceil_ratio((activations > 0).sum(-1, dtype=torch.int32).long(), rho)  # [...] k(x) <= |P(x)|
    # Every neuron of C_rho(x) is among the ceil(rho * F) largest of the row, found on the order-keeping integer
    # view of the activations (see float_bits).
    largest = float_bits(activations).topk(ceil_ratio(activations.shape[-1], rho), dim=-1, sorted=False).values
    # The k(x)-th largest activation [..., 1]; NaN where k(x) is 0, which no activation equals or exceeds.
    threshold = kth_largest(largest, core_size).view(dtype).unsqueeze(-1)
    above = activations > threshold
    tied = activations == threshold
    # Of the neurons tied at the threshold, take the lowest indices until k(x) neurons are chosen.
    num_above = (largest.view(dtype) > threshold).sum(-1, dtype=torch.int32)  # all of them are among the largest
    still_needed = (core_size - num_above).to(torch.int32).unsqueeze(-1)  # [..., 1]
    tie_rank = tied.cumsum(-1, dtype=torch.int32)  # 1-based rank among the tied, by index
    return torch.where(tied, tie_rank <= still_needed, above)


_SAME_WIDTH_INT = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


def float_bits(values: torch.Tensor) -> torch.Tensor:
    """The bits of floats read as signed integers of the same width (a view, no copy).

    IEEE floats keep their order in this view where they are positive, and every negative float (and -0.0) lands
    below +0.0, so that the largest positive values are the largest integers; integers also select faster than
    floats on the CPU (no NaN checks). Among negative floats the order is reversed, which the callers never need.
    """
    as_int = _SAME_WIDTH_INT.get(values.dtype)
    if as_int is None:
        raise ValueError(f"activations must be float16, bfloat16, float32 or float64, got {values.dtype}")
    return values.view(as_int)


def kth_largest(values: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The k-th largest entry of every row of integer values [..., W], for a k [...] that varies per row
    (0 <= k <= W); the dtype's largest integer where k is 0.

    One selection at a common rank: each row gets W - k copies of the dtype's largest integer and k of its
    smallest, so that the (W + 1)-th smallest of the extended row is the k-th largest of the row.
    """
    width = values.shape[-1]
    limits = torch.iinfo(values.dtype)
    slots = torch.arange(width, device=values.device)
    padding = torch.where(slots < (width - k).unsqueeze(-1), limits.max, limits.min).to(values.dtype)
    return torch.cat([values, padding], dim=-1).kthvalue(width + 1, dim=-1).values


def sentence_core_neurons(
    token_core: torch.Tensor, activations: torch.Tensor, token_mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """C_beta(S) for the token set S = token_mask of each sample: sorted neuron indices, LongTensor [B, m].

    f(n) = |{x in S : n in C_rho(x)}|; the m = ceil(beta * F) neurons with the largest f(n) are kept, ties going
    to the larger sum of a_n(x) over S, then to the lower index. An empty S gives f = 0 and sums 0 everywhere,
    hence the m lowest indices.
    """
    width = activations.shape[-1]
    num_core = ceil_ratio(width, beta)
    in_set = token_mask.unsqueeze(-1)  # [B, T, 1]
    frequency = (token_core & in_set).sum(1, dtype=torch.int32)  # [B, F] f(n)
    activation_sum = torch.where(in_set, activations, 0).sum(1, dtype=torch.float32)  # [B, F]
    ranking = _rank_descending(frequency, activation_sum)  # [B, F] neuron indices, best first
    return ranking[:, :num_core].sort(dim=-1).values


def _rank_descending(primary: torch.Tensor, secondary: torch.Tensor) -> torch.Tensor:
    """Indices along the last dim ordered by primary desc, then secondary desc, then index asc."""
    by_secondary = secondary.sort(dim=-1, descending=True, stable=True).indices
    primary_in_that_order = primary.gather(-1, by_secondary)
    by_primary = primary_in_that_order.sort(dim=-1, descending=True, stable=True).indices
    return by_secondary.gather(-1, by_primary)


def neuron_mask(neuron_indices: torch.Tensor, width: int) -> torch.Tensor:
    """Bool mask [B, F] with True at the given indices [B, m]."""
    mask = torch.zeros(neuron_indices.shape[0], width, dtype=torch.bool, device=neuron_indices.device)
    return mask.scatter_(1, neuron_indices, True)


def match_scores(token_core: torch.Tensor, core_neurons_mask: torch.Tensor) -> torch.Tensor:
    """score(x) = |C_rho(x) ∩ C_beta(S_match)| for every token: LongTensor [B, T]."""
    return (token_core & core_neurons_mask.unsqueeze(1)).sum(-1, dtype=torch.int32).long()


def last_token_mask(token_mask: torch.Tensor) -> torch.Tensor:
    """Bool [B, T] marking the last True token of each row (none if the row has none)."""
    positions = torch.arange(token_mask.shape[1], device=token_mask.device)
    last = torch.where(token_mask, positions, -1).amax(dim=1, keepdim=True)  # [B, 1]
    return positions == last


# ---------------------------------------------------------------------------------------------- groups, budgets


@dataclass
class GroupOrder:
    """Tokens sorted into groups (images), best score first inside each group, ties to the lower position.

    The "sorted" tensors are indexed by slot of that order, the others by token. All [B, T].
    """

    order: torch.Tensor  # token index at each slot
    group_sorted: torch.Tensor  # group of the token at each slot (-1 slots come first)
    start_sorted: torch.Tensor  # first slot of that token's group
    rank_sorted: torch.Tensor  # rank inside the group (0 = best)
    size_sorted: torch.Tensor  # size of the group
    rank: torch.Tensor  # rank of each token inside its group
    size: torch.Tensor  # size of each token's group (0 for tokens outside groups)


def order_groups(scores: torch.Tensor, groups: torch.Tensor) -> GroupOrder:
    """Sort every sample's tokens by (group, score descending, position); see GroupOrder."""
    batch, length = scores.shape
    device = scores.device
    by_score = scores.sort(dim=1, descending=True, stable=True).indices
    by_group = groups.gather(1, by_score).sort(dim=1, stable=True).indices
    order = by_score.gather(1, by_group)
    group_sorted = groups.gather(1, order)

    slots = torch.arange(length, device=device).expand(batch, length)
    is_start = torch.ones_like(group_sorted, dtype=torch.bool)
    is_start[:, 1:] = group_sorted[:, 1:] != group_sorted[:, :-1]
    start_sorted = torch.where(is_start, slots, 0).cummax(dim=1).values
    rank_sorted = slots - start_sorted

    size = _per_group_sum(groups, torch.ones_like(groups)).gather(1, groups + 1)  # [B, T]
    size = torch.where(groups >= 0, size, 0)
    size_sorted = size.gather(1, order)
    rank = torch.empty_like(rank_sorted).scatter_(1, order, rank_sorted)
    return GroupOrder(order, group_sorted, start_sorted, rank_sorted, size_sorted, rank, size)


def _per_group_sum(groups: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Sum of values per group: [B, T + 1], column g + 1 for group g, column 0 for tokens outside groups."""
    batch, length = groups.shape
    totals = torch.zeros(batch, length + 1, dtype=values.dtype, device=values.device)
    return totals.scatter_add_(1, groups + 1, values)


def budget_counts(order: GroupOrder, token_budget: int | float, min_tokens: int = 1) -> torch.Tensor:
    """How many tokens each token's group keeps under an int or fractional budget: LongTensor [B, T]."""
    if isinstance(token_budget, float):
        count = ceil_ratio(order.size, token_budget)
    else:
        count = torch.full_like(order.size, token_budget)
    return _clamp_count(count, order.size, min_tokens)


def elbow_counts(scores: torch.Tensor, order: GroupOrder, min_tokens: int = 1) -> torch.Tensor:
    """How many tokens each token's group keeps under the adaptive budget: LongTensor [B, T].

    Per group: sort the scores descending, scale index and score to [0, 1], take the point farthest from the
    chord between the first and the last point (the first such point on ties), keep every token scoring at
    least that point's score. A flat curve or a single token keeps all; never fewer than min_tokens.
    """
    groups = order.group_sorted
    in_group = groups >= 0
    sorted_scores = scores.to(torch.float32).gather(1, order.order)  # [B, T], descending inside a group
    size = order.size_sorted
    highest = sorted_scores.gather(1, order.start_sorted)
    lowest = sorted_scores.gather(1, (order.start_sorted + size - 1).clamp(min=0))
    span = highest - lowest
    x = order.rank_sorted.to(torch.float32) / (size - 1).clamp(min=1).to(torch.float32)
    y = (sorted_scores - lowest) / torch.where(span > 0, span, 1.0)
    # The chord runs from (0, 1) to (1, 0): distance is proportional to |x + y - 1|.
    distance = torch.where(in_group, (x + y - 1).abs(), -1.0)

    slot_group = torch.where(in_group, groups, -1) + 1  # column in the per-group buffers
    batch, length = groups.shape
    farthest = torch.full((batch, length + 1), -1.0, device=scores.device)
    farthest = farthest.scatter_reduce(1, slot_group, distance, reduce="amax")
    is_farthest = in_group & (distance == farthest.gather(1, slot_group))
    never = torch.full_like(order.rank_sorted, length)
    elbow_rank = torch.full((batch, length + 1), length, dtype=torch.long, device=scores.device)
    elbow_rank = elbow_rank.scatter_reduce(1, slot_group, torch.where(is_farthest, order.rank_sorted, never), "amin")
    elbow_slot = (order.start_sorted + elbow_rank.gather(1, slot_group)).clamp(max=length - 1)
    threshold = sorted_scores.gather(1, elbow_slot)  # [B, T] the elbow score of each slot's group

    at_least = (in_group & (sorted_scores >= threshold)).long()
    count_sorted = _per_group_sum(torch.where(in_group, groups, -1), at_least).gather(1, slot_group)
    flat = (span <= 0) | (size <= 1)
    count_sorted = torch.where(flat, size, count_sorted)
    count = torch.empty_like(count_sorted).scatter_(1, order.order, count_sorted)
    return _clamp_count(count, order.size, min_tokens)


def _clamp_count(count: torch.Tensor, size: torch.Tensor, min_tokens: int) -> torch.Tensor:
    return torch.minimum(torch.maximum(count, torch.full_like(count, min_tokens)), size)


def keep_top(order: GroupOrder, count: torch.Tensor) -> torch.Tensor:
    """Bool [B, T]: the `count` best-ranked tokens of each group (count given per token)."""
    return (order.size > 0) & (order.rank < count)


def select_by_score(
    scores: torch.Tensor, groups: torch.Tensor, token_budget: int | float | None, min_tokens: int = 1
) -> torch.Tensor:
    """Keep mask [B, T] over grouped tokens: per group the top tokens by score under the budget.

    token_budget: int m (the m best), float r in (0, 1] (ceil(r * n) of the group's n), None (elbow).
    Ties go to the lower position. Tokens outside groups are never selected.
    """
    order = order_groups(scores, groups)
    if token_budget is None:
        count = elbow_counts(scores, order, min_tokens)
    else:
        count = budget_counts(order, token_budget, min_tokens)
    return keep_top(order, count)


# ---------------------------------------------------------------------------------------------- hashing

HASH_MODULUS = 2**31


def hash_mix(values: torch.Tensor) -> torch.Tensor:
    """A small integer hash of int64 values, elementwise, into [0, 2**31) (no overflow for values < 2**32)."""
    values = values % HASH_MODULUS
    for _ in range(3):
        values = (values * 1103515245 + 12345) % HASH_MODULUS
        values = values ^ (values >> 13)
    return values
