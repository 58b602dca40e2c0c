"""Rules that choose the FFN neurons a layer decodes with, at a given neuron count.

Each rule is a small batched function over one layer's prefill activations. Shapes:
  B batch, T tokens, F FFN width (d_ff), H hidden width.
  activations [B, T, F]   a(x), the input of down_proj (signed for SwiGLU / GeGLU)
  token_mask  [B, T]      bool, the tokens that take part (padding is False)
  count                   how many neurons to keep: the same for every sample, so decode FLOPs are fixed
Rules return sorted neuron indices, LongTensor [B, count]. Costs are O(B * T * F) plus sorts over F.

The rules (named in RULES; `select(rule, ...)` dispatches):
  "paper"      CoreMatching / CoreInfer: the neurons most often among a token's top positive activations
               (C_rho, selection.token_core_neurons); ties to the larger activation sum, then the lower index.
  "magnitude"  the same frequency count over the tokens' top |a| (the share rho of each token's nonzero |a|);
               ties to the larger sum of |a|, then the lower index.
  "mass"       the neurons with the largest activation mass, the sum of |a| over the tokens; ties to the lower
               index.
Two variants build on a ranking: `merge_hot` mixes a static ranking (a "hot" set measured on a calibration
corpus) with the prompt's, and `refreshed_masks` re-chooses the set during decoding from the tokens generated
so far. `top_magnitude_mask` is the per-token threshold of TEAL (dynamic, no prompt set), the reference point.
"""

from __future__ import annotations

import torch

from .selection import ceil_ratio, token_core_neurons

RULES = ("paper", "magnitude", "mass")


def neuron_count(width: int, share: float) -> int:
    """How many of `width` neurons a share in (0, 1] keeps: ceil(share * width) computed exactly, at least 1."""
    return max(1, int(ceil_ratio(width, share)))


# ---------------------------------------------------------------------------------------------- rankings


def rank_descending(primary: torch.Tensor, secondary: torch.Tensor | None = None) -> torch.Tensor:
    """Indices [B, F] ordered by primary desc, then secondary desc, then index asc (stable sorts)."""
    order = torch.arange(primary.shape[-1], device=primary.device).expand_as(primary)
    if secondary is not None:
        order = secondary.sort(dim=-1, descending=True, stable=True).indices
    by_primary = primary.gather(-1, order).sort(dim=-1, descending=True, stable=True).indices
    return order.gather(-1, by_primary)


def paper_ranking(activations: torch.Tensor, token_mask: torch.Tensor, rho: float) -> torch.Tensor:
    """Neurons [B, F], best first: frequency among C_rho(x) over the masked tokens, then activation sum."""
    in_set = token_mask.unsqueeze(-1)
    token_core = token_core_neurons(activations, rho)  # [B, T, F] bool
    frequency = (token_core & in_set).sum(1, dtype=torch.int32)
    activation_sum = torch.where(in_set, activations, 0).sum(1, dtype=torch.float32)
    return rank_descending(frequency, activation_sum)


def magnitude_ranking(activations: torch.Tensor, token_mask: torch.Tensor, rho: float) -> torch.Tensor:
    """Neurons [B, F], best first: frequency among each token's top |a| (rho of its nonzero |a|), then sum |a|."""
    return paper_ranking(activations.abs(), token_mask, rho)


def mass_ranking(activations: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Neurons [B, F], best first: sum of |a| over the masked tokens."""
    mass = torch.where(token_mask.unsqueeze(-1), activations.abs(), 0).sum(1, dtype=torch.float32)
    return rank_descending(mass)


def ranking(rule: str, activations: torch.Tensor, token_mask: torch.Tensor, rho: float = 0.2) -> torch.Tensor:
    if rule == "paper":
        return paper_ranking(activations, token_mask, rho)
    if rule == "magnitude":
        return magnitude_ranking(activations, token_mask, rho)
    if rule == "mass":
        return mass_ranking(activations, token_mask)
    raise ValueError(f"neuron_rule must be one of {RULES}, got {rule!r}")


def select(rule: str, activations: torch.Tensor, token_mask: torch.Tensor, count: int, rho: float = 0.2):
    """The `count` best neurons of each sample under `rule`: sorted LongTensor [B, count]."""
    return ranking(rule, activations, token_mask, rho)[:, :count].sort(dim=-1).values


# ---------------------------------------------------------------------------------------------- variants


def merge_hot(hot_order: torch.Tensor, prompt_order: torch.Tensor, count: int, hot_count: int) -> torch.Tensor:
    """A static "hot" set merged with the prompt's set: sorted LongTensor [B, count].

    hot_order [F]: neurons best first, measured once on a calibration corpus; prompt_order [B, F]: the prompt's
    ranking. The first `hot_count` hot neurons are taken, then the prompt's best neurons not yet taken until
    `count` neurons are chosen.
    """
    batch, width = prompt_order.shape
    chosen = torch.zeros(batch, width, dtype=torch.bool, device=prompt_order.device)
    chosen[:, hot_order[:hot_count]] = True
    free_in_prompt_order = ~chosen.gather(1, prompt_order)  # [B, F]
    take = free_in_prompt_order & (free_in_prompt_order.cumsum(1) <= count - hot_count)
    chosen.scatter_(1, prompt_order, take | chosen.gather(1, prompt_order))
    return mask_to_indices(chosen, count)


def mask_to_indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Sorted indices [B, count] of a bool mask [B, F] with exactly `count` True per row (no host sync)."""
    width = mask.shape[-1]
    slots = torch.arange(width, device=mask.device)
    return torch.where(mask, slots, slots + width).sort(dim=-1).values[:, :count]


def refreshed_masks(
    prompt_mass: torch.Tensor,
    step_activations: torch.Tensor,
    refresh_steps: torch.Tensor,
    count: int,
    carry: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The neuron set of every decode token when the set is re-chosen from the generated tokens.

    prompt_mass [B, F]: mean |a| over the prompt's tokens. step_activations [B, T, F]: the decode tokens'
    activations, dense at refresh steps (refresh_steps [T] bool). The set used at token t is the `count`
    neurons with the largest prompt_mass + mean |a| over the refresh tokens up to and including t (the prompt
    and what was generated weigh the same). carry = (sum of |a| [B, F], number of tokens [B] or scalar) over
    the refresh tokens of earlier calls. Returns masks [B, T, F] (True: computed) and the new carry.
    """
    seen_sum, seen_count = carry
    refresh = refresh_steps.view(1, -1, 1).to(step_activations.dtype)
    cumulative = seen_sum.unsqueeze(1) + (step_activations.abs() * refresh).cumsum(1)  # [B, T, F]
    counts = seen_count + refresh_steps.to(torch.float32).cumsum(0)  # [T]
    generated_mean = cumulative / counts.clamp(min=1).view(1, -1, 1)
    scores = prompt_mass.unsqueeze(1) + generated_mean
    top = scores.topk(count, dim=-1).indices
    masks = torch.zeros_like(step_activations, dtype=torch.bool).scatter_(-1, top, True)
    return masks, (cumulative[:, -1], counts[-1])


def top_magnitude_mask(values: torch.Tensor, count: int) -> torch.Tensor:
    """Per-token threshold (TEAL): bool [..., D], True at the `count` largest |values| of each row."""
    top = values.abs().topk(count, dim=-1).indices
    return torch.zeros_like(values, dtype=torch.bool).scatter_(-1, top, True)
