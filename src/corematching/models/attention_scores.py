"""Attention rows computed from a layer's own projections, so that any attention implementation (sdpa, flash)
can stay in place: nothing here asks the model for `output_attentions`."""

from collections.abc import Callable

import torch
from torch import nn


def _heads(projected: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, T, heads * d] -> [B, heads, T, d]."""
    batch, length = projected.shape[:2]
    return projected.view(batch, length, -1, head_dim).transpose(1, 2)


def last_token_attention(
    attention: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    valid: torch.Tensor,
    rotate: Callable,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """The attention row of each sample's last valid token, averaged over heads: float [B, T].

    For Llama-like attention modules (q_proj, k_proj, head_dim, scaling; optional q_norm / k_norm on each head):
    the attention module's input hidden_states [B, T, H], its (cos, sin) [B or 1, T, d], valid [B, T] bool, and
    rotate(x, cos, sin) applying the family's RoPE to x [B, heads, L, d]. Causal: the last token sees every valid
    token before it (within the sliding window when set); the softmax runs over those keys only.
    """
    batch, length = valid.shape
    device = hidden_states.device
    positions = torch.arange(length, device=device)
    last = torch.where(valid, positions, -1).amax(dim=1)  # [B]
    last_index = last.clamp(min=0)
    head_dim = attention.head_dim
    last_hidden = hidden_states[torch.arange(batch, device=device), last_index].unsqueeze(1)  # [B, 1, H]
    queries = _heads(attention.q_proj(last_hidden), head_dim)  # [B, heads, 1, d]
    keys = _heads(attention.k_proj(hidden_states), head_dim)  # [B, kv heads, T, d]
    if hasattr(attention, "q_norm"):
        queries, keys = attention.q_norm(queries), attention.k_norm(keys)
    cos, sin = position_embeddings
    cos, sin = cos.expand(batch, *cos.shape[1:]), sin.expand(batch, *sin.shape[1:])
    rows = torch.arange(batch, device=device)
    queries = rotate(queries, cos[rows, last_index].unsqueeze(1), sin[rows, last_index].unsqueeze(1))
    keys = rotate(keys, cos, sin)
    keys = keys.repeat_interleave(queries.shape[1] // keys.shape[1], dim=1)  # grouped-query heads
    scores = (queries.float() @ keys.float().transpose(-1, -2)).squeeze(2) * attention.scaling  # [B, heads, T]
    seen = valid & (positions.unsqueeze(0) <= last.unsqueeze(1))
    if sliding_window is not None:
        seen &= last.unsqueeze(1) - positions.unsqueeze(0) < sliding_window
    scores = scores.masked_fill(~seen.unsqueeze(1), float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row without valid tokens is all zeros
    return weights.mean(dim=1)


def keys_over_heads(attention: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The keys of an encoder's attention module (k_proj, head_dim) for its input hidden_states [N, S, D],
    averaged over heads: [N, S, d]."""
    return _heads(attention.k_proj(hidden_states), attention.head_dim).mean(dim=1)


def attention_received(attention: nn.Module, hidden_states: torch.Tensor, from_first_token: bool) -> torch.Tensor:
    """For a bidirectional encoder's attention module (q_proj, k_proj, head_dim, scale; no mask) and its input
    hidden_states [N, S, D]: the attention each token receives, averaged over heads, [N, S] — from the first
    token (a CLS token) when from_first_token, else averaged over all queries."""
    head_dim = attention.head_dim
    scale = getattr(attention, "scale", None) or getattr(attention, "scaling", head_dim**-0.5)
    queries_from = hidden_states[:, :1] if from_first_token else hidden_states
    queries = _heads(attention.q_proj(queries_from), head_dim).float()  # [N, heads, S or 1, d]
    keys = _heads(attention.k_proj(hidden_states), head_dim).float()  # [N, heads, S, d]
    weights = torch.softmax(queries @ keys.transpose(-1, -2) * scale, dim=-1)  # [N, heads, S or 1, S]
    return weights.mean(dim=2).mean(dim=1)
